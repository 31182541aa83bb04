"""Key agreement, share transport and mask expansion for SecAgg+.

- Keys are X25519 (the `cryptography` package, extra `secagg`), made from 32 seeded bytes so
  a run replays on every transport. Nodes keep private keys as raw bytes (plain data that
  checkpoints can save) and rebuild key objects only inside these functions.
- A shared secret goes through HKDF-SHA256 with a purpose label: "enc" keys the
  ChaCha20-Poly1305 AEAD that carries shares from client to client through the server,
  "mask" seeds a pairwise mask.
- Masks: 32-byte seeds expanded by numpy's PCG64 (`random_raw`, vectorised: GB/s) into
  elements of the ring Z/2**64, where numpy's uint64 arithmetic wraps exactly. PCG64 is a
  simulation stand-in for the AES-CTR PRG a deployment would use: fast, seeded and uniform,
  but not a cryptographic generator (perf/bench_secagg.py measures it).
"""

from __future__ import annotations

import struct

import numpy as np

KEY_BYTES = 32
NONCE = struct.Struct("<IIi")  # (src, dst, round): a key is never used twice for one nonce


def keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(private, public) raw X25519 bytes from 32 seed bytes."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    sk = X25519PrivateKey.from_private_bytes(seed)
    return seed, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF(X25519(private, public), info=purpose)."""
    return agree_many(private, [public], purpose)[0]


def agree_many(private: bytes, publics: list[bytes], purpose: bytes) -> list[bytes]:
    """`agree` with each of `publics`, rebuilding the private key object once."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    sk = X25519PrivateKey.from_private_bytes(private)
    info = b"fedloom-secagg-" + purpose
    return [HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info)
            .derive(sk.exchange(X25519PublicKey.from_public_bytes(pub))) for pub in publics]


def seal(key: bytes, src: int, dst: int, rnd: int, plaintext: bytes) -> bytes:
    """ChaCha20-Poly1305 ciphertext of `plaintext` from `src` to `dst` in round `rnd`."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce = NONCE.pack(src, dst, rnd)
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, nonce)


def unseal(key: bytes, src: int, dst: int, rnd: int, ciphertext: bytes) -> bytes | None:
    """The plaintext, or None when the ciphertext was not sealed with this key and header."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce = NONCE.pack(src, dst, rnd)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, bytes(ciphertext), nonce)
    except InvalidTag:
        return None


def expand(seed: bytes, size: int) -> np.ndarray:
    """`size` uniform uint64 ring elements from a 32-byte seed (PCG64)."""
    words = np.frombuffer(seed, np.uint32)
    return np.random.PCG64(words).random_raw(size)


def add_mask(acc: np.ndarray, seed: bytes, sign: int, block: int = 1 << 15) -> None:
    """acc += sign * PRG(seed) in Z/2**64, in blocks small enough to stay in cache (256 KiB:
    twice as fast as one big draw, perf/bench_secagg.py)."""
    bg = np.random.PCG64(np.frombuffer(seed, np.uint32))
    for lo in range(0, acc.size, block):
        hi = min(lo + block, acc.size)
        m = bg.random_raw(hi - lo)
        if sign > 0:
            np.add(acc[lo:hi], m, out=acc[lo:hi])
        else:
            np.subtract(acc[lo:hi], m, out=acc[lo:hi])


def quantise(vec: np.ndarray, frac_bits: int, clip: float, block: int = 1 << 15) -> np.ndarray:
    """Fixed point: round(clip(vec, +-clip) * 2**frac_bits) as two's complement uint64. Works
    in cache-sized float64 blocks (4x faster than whole-array passes, perf/bench_secagg.py);
    scaling by a power of two is exact, so clipping after it is the same."""
    flat = np.ravel(vec)
    scale = float(1 << frac_bits)
    lim = clip * scale
    out = np.empty(flat.size, np.int64)
    buf = np.empty(min(block, flat.size))
    for lo in range(0, flat.size, block):
        hi = min(lo + block, flat.size)
        a = buf[:hi - lo]
        np.multiply(flat[lo:hi], scale, out=a, dtype=np.float64)
        np.clip(a, -lim, lim, out=a)
        np.rint(a, out=a)
        np.copyto(out[lo:hi], a, casting="unsafe")
    return out.view(np.uint64)


def dequantise(ring: np.ndarray, frac_bits: int) -> np.ndarray:
    """Ring elements read as signed fixed point, float64."""
    return np.asarray(ring, np.uint64).view(np.int64).astype(np.float64) / float(1 << frac_bits)
