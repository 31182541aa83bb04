"""Codec micro-benchmark: each measurement beside its floor (the bare numpy / lz4 / msgpack work it
sits on), timed side by side in one run. `python -m perf.bench_codec [--quick]` prints medians
and ratios; `run(quick)` returns the rows for `fedloom perf micro`."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import lz4.block
import msgpack
import numpy as np

from kernel.messages import Message
from kernel.wire.codec import Codec, body_nbytes, join

_MB = 1e6


def _median_s(fn: Callable[[], Any], reps: int) -> float:
    return _paired(fn, None, reps)[0]


def _paired(ours: Callable[[], Any], floor: Callable[[], Any] | None,
            reps: int) -> tuple[float, float]:
    """Median seconds of `ours` and of `floor`, run alternately so that load from other
    processes falls on both alike."""
    fns = [ours] if floor is None else [ours, floor]
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:
        f()  # warm caches and the allocator
    for _ in range(reps):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    meds = [statistics.median(ts) for ts in times]
    return meds[0], (meds[1] if floor is not None else float("nan"))


def _row(name: str, value: float, unit: str, floor: float | None, floor_name: str | None,
         **extra: Any) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "floor": floor, "floor_name": floor_name,
            **extra}


def _tensor_rows(n: int, reps: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    dense = rng.standard_normal(n).astype(np.float32)
    sparse = dense.copy()
    sparse[rng.random(n) < 0.9] = 0.0
    fp16 = rng.standard_normal(n).astype(np.float16).astype(np.float32)
    mb = dense.nbytes / _MB
    auto, shuf = Codec(compression="auto"), Codec(compression="shuffle+lz4")
    rows = []

    def msg(a: np.ndarray) -> Message:
        return Message(0, 1, "model", {"w": a}, 0.0, 1)

    # Dense random floats: auto must notice that lz4 does not pay and send the array as it is.
    m = msg(dense)
    frame = join(auto.encode(m))

    def bare_copy() -> None:
        np.frombuffer(dense.tobytes(), np.float32)

    def enc_dec() -> None:
        auto.encode(m)
        auto.decode(frame)

    ours, floor = _paired(enc_dec, bare_copy, reps)
    rows.append(_row(f"dense {mb:.0f} MB auto: encode+decode", ours * 1e3, "ms", floor * 1e3,
                     "tobytes+frombuffer", target="<= 1.25x floor",
                     ratio=dense.nbytes / len(frame)))
    ours, floor = _paired(lambda: auto.decode(join(auto.encode(m))), bare_copy, reps)
    rows.append(_row(f"dense {mb:.0f} MB auto: encode+join+decode", ours * 1e3, "ms",
                     floor * 1e3, "tobytes+frombuffer"))

    # A gossip-sized dense message (W4: 100k float32): what auto's sampling costs per message.
    mid = dense[:100_000].copy()
    m = msg(mid)
    ours, floor = _paired(lambda: auto.roundtrip(m),
                          lambda: np.frombuffer(mid.tobytes(), np.float32), reps * 20)
    rows.append(_row("dense 0.4 MB auto: roundtrip (encode+join+decode)", ours * 1e6, "us",
                     floor * 1e6, "tobytes+frombuffer"))

    # 90% zeros: auto compresses with plain lz4; the floor is lz4 alone on the same bytes.
    m = msg(sparse)
    raw = sparse.view(np.uint8).data
    size = len(join(auto.encode(m)))
    ours, floor = _paired(
        lambda: auto.decode(join(auto.encode(m))),
        lambda: lz4.block.decompress(lz4.block.compress(raw, store_size=False),
                                     uncompressed_size=sparse.nbytes),
        reps)
    rows.append(_row(f"90%-zero {mb:.0f} MB auto: encode+join+decode", mb / ours, "MB/s",
                     mb / floor, "lz4.block compress+decompress", higher_is_better=True,
                     ratio=sparse.nbytes / size, target="ratio >= 5x, >= 70% of floor speed"))

    # fp16-exact float32 with shuffle+lz4: the byte planes of the low mantissa are all zero.
    m = msg(fp16)
    raw16 = fp16.view(np.uint8).data
    size = len(join(shuf.encode(m)))
    ours, floor = _paired(
        lambda: shuf.decode(join(shuf.encode(m))),
        lambda: lz4.block.decompress(lz4.block.compress(raw16, store_size=False),
                                     uncompressed_size=fp16.nbytes),
        reps)
    plain = fp16.nbytes / len(lz4.block.compress(raw16, store_size=False))
    rows.append(_row(f"fp16-exact {mb:.0f} MB shuffle+lz4: encode+join+decode", mb / ours,
                     "MB/s", mb / floor, "lz4.block compress+decompress (unshuffled)",
                     higher_is_better=True, ratio=fp16.nbytes / size, ratio_plain_lz4=plain,
                     target="ratio >= 1.5x"))
    return rows


def _small_rows(reps: int) -> list[dict[str, Any]]:
    codec = Codec()
    body = {"round": 3, "loss": 0.25, "ids": [1, 2, 3], "tag": "update"}
    m = Message(0, 1, "ping", body, 1.5, 7)
    plain = [0, 1, "ping", 1.5, 7, body]
    n = 20000

    def looped(fn: Callable[[], Any]) -> Callable[[], None]:
        def loop() -> None:
            for _ in range(n):
                fn()
        return loop

    ours, floor = _paired(looped(lambda: codec.roundtrip(m)),
                          looped(lambda: msgpack.unpackb(msgpack.packb(plain))), reps)
    rows = [_row("small message roundtrip", ours / n * 1e6, "us", floor / n * 1e6,
                 "msgpack packb+unpackb")]
    est = _median_s(looped(lambda: body_nbytes(body)), reps)
    rows.append(_row("body_nbytes, 4-entry body", est / n * 1e6, "us", None, None))
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows of medians: the codec against bare tobytes/lz4/msgpack on the same data."""
    reps = 5 if quick else 9
    return _tensor_rows(2_500_000 if quick else 10_000_000, reps) + _small_rows(reps)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="10 MB tensors instead of 40 MB")
    args = ap.parse_args()
    rows = run(args.quick)
    print(f"{'measurement':52s} {'ours':>12s} {'floor':>12s} {'cost':>6s}  notes")
    for r in rows:
        ours, floor, hib = r["value"], r["floor"], r.get("higher_is_better", False)
        cost = "" if floor is None else f"{(floor / ours if hib else ours / floor):.2f}x"
        extra = {k: v for k, v in r.items()
                 if k not in ("name", "value", "unit", "floor", "floor_name", "higher_is_better")}
        notes = ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items())
        fl = "-" if floor is None else f"{floor:.3g} {r['unit']}"
        print(f"{r['name']:52s} {ours:>9.3g} {r['unit']:<3s}{fl:>12s} {cost:>6s}  "
              f"[{r['floor_name'] or '-'}] {notes}")


if __name__ == "__main__":
    main()
