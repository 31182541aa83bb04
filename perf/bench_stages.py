"""Lossy codec stages: what each costs and what each buys.

1. Encode and decode throughput of every stage on one float32 tensor (40 MB; 10 MB with
   --quick) through `Codec.encode` / `Codec.decode`, each beside the floor of copying the same
   bytes into a reused buffer, timed alternately; with the compression ratio (raw bytes /
   frame bytes) and the relative RMS error of what decodes. Sparse decodes allocate their
   dense output with calloc: its pages are paid for by whoever first touches them.
2. W2 (FedAvg, 100 clients, 10 sampled, 10 rounds) on inproc with `transport.strict = true`, so
   every message really passes the stages: final test accuracy against total bytes carried,
   for no compression, fp16, int8, int4 and top-k, the last two also on deltas with error
   feedback (`protocols.compression:fedavg_ef`). Target: int8 within 1 percentage point of
   the uncompressed accuracy at about a quarter of the bytes.

    python -m perf.bench_stages [--quick] [--out DIR]   # DIR gets stages.md, accuracy_vs_bytes.png

`run(quick)` returns the rows for `fedloom perf micro`.
"""

from __future__ import annotations

import argparse
import functools
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from kernel.messages import Message
from kernel.run import runner
from kernel.wire.codec import Codec, join
from perf.bench_codec import _fmt, _paired, _row

WORKLOADS = Path(__file__).resolve().parent / "workloads"
_MB = 1e6

# (label, [codec.rules] entry) for the throughput table.
STAGE_SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("fp16", {"stages": ["fp16"]}),
    ("bf16", {"stages": ["bf16"]}),
    ("int8", {"stages": ["int8"]}),
    ("int8 stochastic", {"stages": ["int8"], "stochastic": True}),
    ("int4", {"stages": ["int4"]}),
    ("int4 stochastic", {"stages": ["int4"], "stochastic": True}),
    ("top-1%", {"stages": ["topk"], "fraction": 0.01}),
    ("rand-1%", {"stages": ["randk"], "fraction": 0.01}),
    ("top-1% + int8", {"stages": ["topk", "int8"], "fraction": 0.01}),
]

_EF = "protocols.compression:fedavg_ef"
# (label, protocol overrides, codec table) for W2; "train" is the server's model broadcast,
# "update" the clients' replies (models, or deltas under fedavg_ef).
W2_SETTINGS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("none", {}, {}),
    ("fp16", {}, {"stages": {"train": "fp16", "update": "fp16"}}),
    ("int8", {}, {"stages": {"train": "int8", "update": "int8"}}),
    ("int4", {}, {"stages": {"train": "int4", "update": "int4"}}),
    ("int4 stochastic", {}, {"rules": [{"kind": "*", "stages": ["int4"], "stochastic": True}]}),
    ("int4 deltas + EF (down int8)", {"name": _EF},
     {"stages": {"train": "int8", "update": "int4"}}),
    ("top-1% + EF (down int8)", {"name": _EF}, {"stages": {"train": "int8", "update": "topk"}}),
    ("top-1% no EF (down int8)", {"name": _EF, "error_feedback": False},
     {"stages": {"train": "int8", "update": "topk"}}),
    ("top-10% + EF (down int8)", {"name": _EF},
     {"stages": {"train": "int8"},
      "rules": [{"kind": "update", "stages": ["topk"], "fraction": 0.1}]}),
]
QUICK_W2 = ("none", "fp16", "int8", "top-1% + EF (down int8)")


# ----------------------------------------------------------------------------- throughput

def stage_rows(n: int, reps: int) -> list[dict[str, Any]]:
    """Encode and decode rows for each stage on `n` float32 normals."""
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    mb = x.nbytes / _MB
    rows = []

    buf = np.empty_like(x)

    def copy() -> None:
        # Into a reused buffer: a stable floor (fresh memory swings 1.3-9 GB/s with the
        # allocator), the cost of reading and writing the tensor once.
        np.copyto(buf, x)

    for label, rule in STAGE_SETTINGS:
        codec = Codec(rules=[{"kind": "update", **rule}])
        msg = Message(1, 0, "update", {"w": x}, 0.0, 1)
        frame = join(codec.encode(msg))
        out = codec.decode(frame).body["w"]
        err = float(np.sqrt(np.mean((out - x).astype(np.float64) ** 2) / np.mean(x * x)))
        ratio = x.nbytes / len(frame)
        enc, floor = _paired(functools.partial(codec.encode, msg), copy, reps)
        rows.append(_row(f"{label} {mb:.0f} MB: encode", mb / enc, "MB/s", mb / floor,
                         "copy into a reused buffer", higher_is_better=True, ratio=ratio,
                         rel_rms_error=err))
        dec, floor = _paired(functools.partial(codec.decode, frame), copy, reps)
        rows.append(_row(f"{label} {mb:.0f} MB: decode", mb / dec, "MB/s", mb / floor,
                         "copy into a reused buffer", higher_is_better=True, ratio=ratio))
    return rows


# ------------------------------------------------------------------------------------- W2

def w2_config(protocol: dict[str, Any], codec: dict[str, Any]) -> dict[str, Any]:
    """W2 on strict inproc with these `[protocol]` overrides and `[codec]` table."""
    cfg = tomllib.loads((WORKLOADS / "w2.toml").read_text())
    cfg["transport"]["strict"] = True
    cfg["run"]["progress"] = False
    cfg["protocol"].update(protocol)
    if codec:
        cfg["codec"] = codec
    return cfg


def w2_runs(labels: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One W2 run per setting: final accuracy, bytes, and accuracy after each round."""
    out = []
    for label, proto, codec in W2_SETTINGS:
        if labels is not None and label not in labels:
            continue
        rec = runner.execute(w2_config(proto, codec), quiet=True)
        res = rec.result
        rounds = [r for r in rec.rows if r.get("name") == "round"]
        up = [r["sent_bytes"] for r in rec.rows if r.get("name") == "compression"]
        out.append({"setting": label, "accuracy": res["test_accuracy"], "bytes": res["bytes"],
                    "messages": res["messages"], "rounds_s": res["rounds_s"],
                    "per_round": [r["accuracy"] for r in rounds],
                    "uplink_stage_bytes": sum(up) if up else None})
    return out


def w2_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next(r for r in runs if r["setting"] == "none")
    rows = []
    for r in runs:
        extra: dict[str, Any] = {"bytes": r["bytes"], "bytes_vs_none": r["bytes"] / base["bytes"],
                                 "accuracy_pp_vs_none": 100 * (r["accuracy"] - base["accuracy"])}
        if r["setting"] == "int8":
            extra["target"] = "within 1 pp of none at ~0.25x the bytes"
        rows.append(_row(f"W2 {r['setting']}: final accuracy", 100 * r["accuracy"], "%",
                         100 * base["accuracy"], "W2 uncompressed", higher_is_better=True,
                         **extra))
    return rows


# --------------------------------------------------------------------------------- outputs

def write_report(out: Path, stage: list[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    """stages.md (both tables) and accuracy_vs_bytes.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    base = next(r for r in runs if r["setting"] == "none")
    lines = ["# Lossy codec stages", "",
             "## Throughput (float32 normals, Codec.encode / Codec.decode, medians; floor: "
             "copying the tensor into a reused buffer)", "",
             "| stage | op | MB/s | floor MB/s | ratio (raw/frame) | rel. RMS error |",
             "|---|---|---:|---:|---:|---:|"]
    for r in stage:
        label, op = r["name"].rsplit(": ", 1)
        err = r.get("rel_rms_error")
        lines.append(f"| {label} | {op} | {r['value']:.0f} | {r['floor']:.0f} | "
                     f"{r['ratio']:.2f} | {'' if err is None else f'{err:.2g}'} |")
    lines += ["", "## W2 (FedAvg, 100 clients, 10 per round, 10 rounds; inproc strict)", "",
              "| setting | final accuracy | vs none (pp) | total MB | bytes vs none |",
              "|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['setting']} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * (r['accuracy'] - base['accuracy']):+.2f} | "
                     f"{r['bytes'] / _MB:.1f} | {r['bytes'] / base['bytes']:.3f} |")
    lines += ["", "Bytes are encoded frame sizes (both directions: the model broadcast and the "
              "replies). \"down int8\": the broadcast is int8 too.", ""]
    (out / "stages.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in runs:
        per = r["per_round"]
        xs = [r["bytes"] / _MB * (i + 1) / len(per) for i in range(len(per))]
        ax.plot(xs, [100 * a for a in per], marker="o", ms=3, label=r["setting"])
    ax.set_xscale("log")
    ax.set_xlabel("bytes carried so far (MB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("W2: accuracy against bytes on the wire")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=120)
    plt.close(fig)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Throughput rows for every stage, then W2 accuracy rows (fewer settings when quick)."""
    stage = stage_rows(2_500_000 if quick else 10_000_000, 5 if quick else 7)
    return stage + w2_rows(w2_runs(QUICK_W2 if quick else None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 MB tensor, 4 W2 settings")
    ap.add_argument("--out", type=Path, help="write stages.md and accuracy_vs_bytes.png here")
    args = ap.parse_args()
    stage = stage_rows(2_500_000 if args.quick else 10_000_000, 5 if args.quick else 7)
    runs = w2_runs(QUICK_W2 if args.quick else None)
    rows = stage + w2_rows(runs)
    print(f"{'measurement':46s} {'ours':>14s} {'floor':>14s}  notes")
    for r in rows:
        extra = {k: v for k, v in r.items()
                 if k not in ("name", "value", "unit", "floor", "floor_name", "higher_is_better")}
        notes = ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items())
        print(f"{r['name']:46s} {r['value']:>9.4g} {r['unit']:<4s} {r['floor']:>9.4g} "
              f"{r['unit']:<4s} {notes}")
    if args.out is not None:
        write_report(args.out, stage, runs)
        print(f"wrote {args.out / 'stages.md'} and {args.out / 'accuracy_vs_bytes.png'}")


if __name__ == "__main__":
    main()
