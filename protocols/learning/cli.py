"""`fedloom data CONFIG [--set k=v ...] [--out DIR] [--all]`: a config's data partition.

Prints samples and label counts per client (the first 20 unless --all) and summary statistics;
with --out, writes DIR/partition.csv (every client: train and held-out samples, count per
class) and DIR/label_distribution.png (clients by classes, stacked counts per client, as
flwr-datasets' `plot_label_distributions` draws it; needs matplotlib, the `plot` extra).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kernel.options import ConfigError

SHOWN = 20


def label_counts(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(train counts [clients, classes], held-out samples [clients]) of a learner's data."""
    classes = int(data.classes)
    train = getattr(data, "train", None)
    if train is not None:  # PooledData: one bincount over all clients
        owner = np.repeat(np.arange(train.clients), train.sizes)
        flat = np.bincount(owner * classes + data.y[train.indices],
                           minlength=train.clients * classes)
        return flat.reshape(train.clients, classes), data.held.sizes.copy()
    n = data.mixture.n if hasattr(data, "mixture") else 0
    clients = getattr(data, "clients", n)
    rows, held = [], []
    for i in range(clients):
        rows.append(np.bincount(data.client(i)[1], minlength=classes))
        held.append(len(data.holdout(i)[1]) if data.has_holdout else 0)
    return np.array(rows).reshape(-1, classes), np.array(held, np.int64)


def summary(counts: np.ndarray, held: np.ndarray) -> list[str]:
    """Lines of summary statistics: sizes, classes per client, label skew."""
    sizes = counts.sum(1)
    total = counts.sum(0)
    glob = total / max(total.sum(), 1)
    share = counts / np.maximum(sizes, 1)[:, None]
    tv = 0.5 * np.abs(share - glob).sum(1)[sizes > 0]
    present = (counts > 0).sum(1)
    return [
        f"clients          {len(sizes)} ({int((sizes == 0).sum())} with no training samples)",
        f"train samples    {int(sizes.sum())} (per client min {int(sizes.min())}, median "
        f"{float(np.median(sizes)):g}, mean {sizes.mean():.1f}, max {int(sizes.max())})",
        f"held out         {int(held.sum())} (per client min {int(held.min())}, max "
        f"{int(held.max())})",
        f"classes/client   mean {present.mean():.2f}, min {int(present.min())}, max "
        f"{int(present.max())} of {counts.shape[1]}",
        f"label skew       mean total-variation distance from the global label mix "
        f"{float(tv.mean()) if tv.size else 0.0:.3f} (0 = IID, 1 = disjoint)",
    ]


def table(counts: np.ndarray, held: np.ndarray, rows: Sequence[int]) -> list[str]:
    """One line per client in `rows`: samples, held out, count per class."""
    c = counts.shape[1]
    head = f"{'client':>7} {'train':>7} {'held':>5}  " + " ".join(f"{k:>5}" for k in range(c))
    lines = [head]
    for i in rows:
        lines.append(f"{i:>7} {int(counts[i].sum()):>7} {int(held[i]):>5}  "
                     + " ".join(f"{int(v):>5}" for v in counts[i]))
    return lines


def write_csv(path: Path, counts: np.ndarray, held: np.ndarray) -> None:
    cols = ",".join(f"class_{k}" for k in range(counts.shape[1]))
    lines = [f"client,train,held_out,{cols}"]
    lines += [f"{i},{int(counts[i].sum())},{int(held[i])}," + ",".join(str(int(v)) for v in row)
              for i, row in enumerate(counts)]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, counts: np.ndarray, title: str) -> None:
    """Clients on the x axis, stacked bars of per-class counts (flwr-datasets' picture);
    beyond 200 clients, the first 200."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("fedloom data --out draws with matplotlib, which is not installed "
                          "(pip install 'fedloom[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = counts[:200]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(shown) + 2), 4.5))
    bottom = np.zeros(len(shown))
    cmap = plt.get_cmap("tab10" if counts.shape[1] <= 10 else "tab20")
    for k in range(counts.shape[1]):
        ax.bar(np.arange(len(shown)), shown[:, k], bottom=bottom, width=0.8,
               color=cmap(k % cmap.N), label=str(k))
        bottom += shown[:, k]
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("client" + (" (first 200)" if len(counts) > 200 else ""))
    ax.set_ylabel("training samples")
    ax.set_title(title)
    if counts.shape[1] <= 20:
        ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main(argv: Sequence[str]) -> int:
    """`argv` = ["data", CONFIG, ...]; returns the exit code."""
    p = argparse.ArgumentParser(prog="fedloom data",
                                description="Show how a config splits its data over clients.")
    p.add_argument("config", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write partition.csv and label_distribution.png into DIR")
    p.add_argument("--all", action="store_true", help="print every client, not the first 20")
    ns = p.parse_args(list(argv)[1:])
    try:
        return _main(ns)
    except (ConfigError, OSError) as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return 1


def _main(ns: argparse.Namespace) -> int:
    from kernel.run.config import load
    from protocols import learners

    config = load(ns.config, ns.overrides)
    learner = learners.make(config)
    data = getattr(learner, "data", None)
    if data is None or not hasattr(data, "classes"):
        raise ConfigError(f"{ns.config}: the learner {type(learner).__name__} does not say "
                          f"how its data is split (no data.classes)")
    counts, held = label_counts(data)
    rows = range(len(counts)) if ns.all else range(min(SHOWN, len(counts)))
    spec = config.get("data", {})
    kind = spec.get("partition", {}).get("kind", "iid")
    title = f"{spec.get('dataset', 'mixture')}, {kind}, {len(counts)} clients"
    print(title)
    print("\n".join(table(counts, held, rows)))
    if len(rows) < len(counts):
        print(f"... {len(counts) - len(rows)} more clients (--all prints them)")
    print("\n".join(summary(counts, held)))
    if ns.out is not None:
        ns.out.mkdir(parents=True, exist_ok=True)
        # Drawn first: a failed plot leaves no partial folder contents behind it.
        tmp = ns.out / ".label_distribution.png.tmp"
        plot(tmp, counts, title)
        write_csv(ns.out / "partition.csv", counts, held)
        tmp.replace(ns.out / "label_distribution.png")
        print(f"wrote {ns.out / 'partition.csv'} and {ns.out / 'label_distribution.png'}")
    return 0
