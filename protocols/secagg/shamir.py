"""Shamir secret sharing of byte strings over the prime field GF(2**521 - 1).

A secret of up to 64 bytes is read as one field element (big-endian), so a 32-byte seed or
X25519 private key is one polynomial of degree `t - 1`; any `t` shares recover it, fewer
reveal nothing. Holders are numbered from 1 (x = 0 is the secret). Pure Python ints: the
protocol shares a few dozen secrets per client per round, so speed does not matter here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PRIME = (1 << 521) - 1  # a Mersenne prime larger than any 64-byte secret
SECRET_BYTES = 64
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(ValueError):
    """Shares that cannot recover a secret: too few, repeated holders, or malformed."""


def split(secret: bytes, holders: Sequence[int], t: int, rng: np.random.Generator) -> list[bytes]:
    """Shares of `secret` for the holders (distinct ints >= 1, in the given order), any `t` of
    which recover it; coefficients come from `rng` (seeded, so runs replay)."""
    if len(secret) > SECRET_BYTES:
        raise ShamirError(f"secret of {len(secret)} bytes; at most {SECRET_BYTES}")
    if not 1 <= t <= len(holders):
        raise ShamirError(f"threshold {t} with {len(holders)} holders; need 1 <= t <= holders")
    if len(set(holders)) != len(holders) or min(holders) < 1:
        raise ShamirError(f"holders must be distinct ints >= 1, got {list(holders)[:8]}...")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [int.from_bytes(rng.bytes(SHARE_BYTES), "big") % PRIME for _ in range(t - 1)]
    out = []
    for x in holders:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append(y.to_bytes(SHARE_BYTES, "big"))
    return out


def combine(shares: Sequence[tuple[int, bytes]], t: int, size: int) -> bytes:
    """The `size`-byte secret from at least `t` (holder, share) pairs (the first t are used,
    so callers pass them in a canonical order)."""
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} shares, threshold {t}")
    pts = [(int(x), int.from_bytes(s, "big")) for x, s in shares[:t]]
    xs = [x for x, _ in pts]
    if len(set(xs)) != len(xs):
        raise ShamirError(f"repeated holder among {xs}")
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * size):
        raise ShamirError(f"shares do not recover a {size}-byte secret (wrong or mixed shares)")
    return secret.to_bytes(size, "big")
