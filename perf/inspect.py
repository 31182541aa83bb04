"""`fedloom inspect DIR`: what a run folder, a compare folder or a micro folder holds, in a few
lines a person reads."""

from __future__ import annotations

import json
import statistics
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

RUN_FILES = ("result.json", "metrics.jsonl", "final_model.npz", "config.toml")
MAX_ROUNDS_SHOWN = 30
MAX_FIELDS_SHOWN = 6


class InspectError(ValueError):
    """The path is not something `fedloom inspect` understands; the message names it."""


def inspect(path: str | Path) -> str:
    """A text summary of a run folder (result.json), a compare folder (results.jsonl or
    report.md) or a micro folder (micro.md)."""
    p = Path(path)
    if not p.exists():
        raise InspectError(f"{p} does not exist")
    if not p.is_dir():
        raise InspectError(f"{p} is a file, not a folder; give a run folder (with result.json) "
                           f"or a compare folder (with results.jsonl)")
    if (p / "result.json").is_file():
        return run_summary(p)
    if (p / "checkpoint.fl").is_file():
        return checkpoint_summary(p)
    if (p / "metrics.jsonl").is_file():
        return run_summary(p)  # a run that died before writing result.json
    if (p / "results.jsonl").is_file() or (p / "report.md").is_file():
        return compare_summary(p)
    if (p / "micro.md").is_file():
        return headline(p / "micro.md", tables=True)
    present = sorted(x.name for x in p.iterdir())[:12]
    raise InspectError(
        f"{p} is not a fedloom run folder: it has no result.json, metrics.jsonl or "
        f"checkpoint.fl (a run folder, from "
        f"`fedloom run --out DIR`), no results.jsonl or report.md (a compare folder) and no "
        f"micro.md; it holds: {', '.join(present) or 'nothing'}"
    )


# -- run folders -----------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InspectError(f"{path} cannot be read as JSON: {exc}") from exc


def metric_rows(path: Path) -> Iterator[dict[str, Any]]:
    """metrics.jsonl's rows; a bad line is an error naming the file and line."""
    if not path.is_file():
        return
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise InspectError(f"{path}:{i}: not a JSON row ({exc})") from exc


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _secs(v: Any) -> str | None:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    return f"{v:.4g}"


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def run_summary(p: Path) -> str:
    """Headline of result.json, the rounds table from metrics.jsonl, the files, the config's
    differences from the built-in default."""
    has_result = (p / "result.json").is_file()
    r: Any = _read_json(p / "result.json") if has_result else {
        "reason": "unknown: no result.json (the run was killed, or is still running)"}
    if not isinstance(r, Mapping):
        raise InspectError(f"{p / 'result.json'} holds {type(r).__name__}, not a JSON object")
    out = [f"run folder {p}", ""]
    head = (f"{r.get('protocol', '?')} on {r.get('transport', '?')}, seed {r.get('seed', '?')}: "
            f"{r.get('reason', '?')}")
    if r.get("finished_by") is not None:
        head += f" by node {r['finished_by']}"
    out.append(head)
    secs = _secs
    fields = [
        ("rounds", _fmt(r.get("rounds"))),
        ("test accuracy", _fmt(r.get("test_accuracy"))),
        ("wall s", secs(r.get("wall_s"))),
        ("  build s", secs(r.get("build_s"))),
        ("  start-up s", secs(r.get("startup_s"))),
        ("  rounds s", secs(r.get("rounds_s"))),
        ("virtual s", secs(r.get("virtual_s"))),
        ("messages", _fmt(r.get("messages"))),
        ("bytes", f"{_fmt(r.get('bytes'))} ({human_bytes(r.get('bytes'))})"
         if r.get("bytes") is not None else None),
        ("events", _fmt(r.get("events"))),
        ("peak RSS MiB", f"{r['peak_rss_mb']:,.1f}"
         if isinstance(r.get("peak_rss_mb"), int | float) else None),
        ("model sha256", r.get("final_model_sha256")),
    ]
    out += [f"  {k:<14} {v}" for k, v in fields if v not in (None, "-")]
    if r.get("error"):
        out.append(f"  error          {str(r['error']).splitlines()[0][:300]}")
    extra = r.get("extra")
    if isinstance(extra, Mapping) and extra:
        out.append("  extra          " + ", ".join(
            f"{k}={_fmt(v)}" for k, v in sorted(extra.items())
            if isinstance(v, int | float | str | bool | None)))
    shards = r.get("shards")
    if isinstance(shards, list) and len(shards) > 1:
        out.append(f"  shards         {len(shards)}")

    rounds = [m for m in metric_rows(p / "metrics.jsonl") if m.get("name") == "round"]
    out += ["", *rounds_table(rounds)]
    out += _files(p)
    diff = config_diff(p / "config.toml")
    if diff:
        out += ["", "config, where it differs from the built-in default (W1):", *diff]
    return "\n".join(out) + "\n"


def checkpoint_summary(p: Path) -> str:
    """What the checkpoint of an unfinished run holds: its run, how far it got, its rounds
    so far, and how to resume it. The file is verified (sha256) before anything is shown."""
    from kernel.run.checkpoint import CheckpointError, read

    try:
        loaded = read(p)
    except CheckpointError as exc:
        raise InspectError(str(exc)) from None
    cfg, h = loaded.config, loaded.header
    run = cfg.get("run", {})
    out = [f"run folder {p} (a checkpoint: the run has not finished)", "",
           f"{cfg.get('protocol', {}).get('name', '?')} on "
           f"{cfg.get('transport', {}).get('kind', '?')}, seed {run.get('seed', '?')}: "
           f"stopped at round {_fmt(loaded.round)} of {_fmt(run.get('rounds'))}",
           f"  virtual s      {_secs(h.get('virtual_s'))}",
           f"  events         {_fmt(h.get('events'))}",
           f"  written by     fedloom {h.get('fedloom')}",
           f"  resume with    fedloom run --resume {p}"]
    rounds = [m for m in loaded.rows if m.get("name") == "round"]
    out += ["", *rounds_table(rounds), *_files(p)]
    return "\n".join(out) + "\n"


def _files(p: Path) -> list[str]:
    out = ["", "files:"]
    for f in sorted(p.iterdir()):
        if f.is_file():
            out.append(f"  {f.name:<20} {human_bytes(f.stat().st_size):>10}")
        elif f.is_dir():
            out.append(f"  {f.name + '/':<20} {'(folder)':>10}")
    missing = [f for f in RUN_FILES if not (p / f).exists()]
    if missing:
        out.append(f"  missing: {', '.join(missing)}")
    return out


def rounds_table(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per round row: round, t and the numeric fields the protocol emitted."""
    if not rounds:
        return ["no per-round rows in metrics.jsonl"]
    skip = {"name", "node", "value", "t"}
    keys: list[str] = []
    for row in rounds:
        for k, v in row.items():
            if k not in skip and k not in keys and isinstance(v, int | float | None):
                keys.append(k)
    preferred = [k for k in ("accuracy", "loss") if k in keys]
    keys = (preferred + [k for k in keys if k not in preferred])[:MAX_FIELDS_SHOWN]
    header = ["round", "t", *keys]
    body = [[_fmt(row.get("value")), _fmt(row.get("t")), *[_fmt(row.get(k)) for k in keys]]
            for row in rounds]
    if len(body) > MAX_ROUNDS_SHOWN:
        half = MAX_ROUNDS_SHOWN // 2
        body = [*body[:half], ["..."] * len(header), *body[-half:]]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = [f"rounds ({len(rounds)}):",
             "  " + "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return lines


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(path: Path) -> list[str]:
    """`key = value  (default: ...)` for every key of config.toml that the built-in default
    config lacks or sets otherwise; empty when there is no config or no default to compare."""
    if not path.is_file():
        return []
    try:
        ran = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return [f"  (config.toml cannot be read: {exc})"]
    try:
        from kernel.run.config import default_config

        base = _flat(default_config())
    except Exception:  # no kernel or an unusable default: list the config as it is
        base = {}
    out = []
    for k, v in sorted(_flat(ran).items()):
        if k not in base:
            out.append(f"  {k} = {v!r}")
        elif base[k] != v:
            out.append(f"  {k} = {v!r}  (default {base[k]!r})")
    return out


# -- compare and micro folders ---------------------------------------------------------------
def headline(md: Path, tables: bool = False) -> str:
    """The markdown's text before its first table (with `tables`, through its first table)."""
    lines = md.read_text().splitlines()
    out: list[str] = [f"{md.parent} ({md.name})", ""]
    in_table = False
    for line in lines:
        is_row = line.startswith("|")
        if is_row and not tables:
            break
        if in_table and not is_row:
            break
        in_table = in_table or is_row
        if line.startswith("## ") and not in_table and tables and out[-1] != "":
            out.append("")
        out.append(line)
    while out and (out[-1] == "" or out[-1].startswith("## ")):
        out.pop()
    return "\n".join(out) + "\n"


def cell_line(rows: Sequence[Mapping[str, Any]], cell: str) -> str:
    """Medians of one cell's counted runs: wall, per round, peak RSS, accuracy."""
    from perf import report

    def med(metric: str, fmt: str) -> str | None:
        vals = report.cell_values(rows, cell, metric)
        return None if not vals else fmt.format(statistics.median(vals))

    parts = [f"{len(report.cell_values(rows, cell, 'wall_s'))} ok runs",
             med("wall_s", "wall {:.3g} s"), med("round_s", "{:.3g} s/round"),
             med("peak_rss_mb", "peak RSS {:,.0f} MiB"), med("test_accuracy", "accuracy {:.4f}")]
    return ", ".join(p for p in parts if p)


def compare_summary(p: Path) -> str:
    """report.md's headline, how many runs results.jsonl holds, and the files."""
    out = []
    if (p / "report.md").is_file():
        out.append(headline(p / "report.md").rstrip())
    else:
        out.append(f"compare folder {p} (no report.md yet: the comparison is running or was cut "
                   f"short; `fedloom perf report {p}` writes it)")
    results = p / "results.jsonl"
    if results.is_file():
        rows = list(metric_rows(results))
        ok = sum(1 for r in rows if r.get("ok"))
        cells = list(dict.fromkeys(r.get("cell") for r in rows))
        out += ["", f"results.jsonl: {len(rows)} runs ({ok} ok) over {len(cells)} cells:"]
        out += [f"  {c}: {cell_line(rows, str(c))}" for c in cells]
    pngs = sorted(x.name for x in p.glob("*.png"))
    if pngs:
        out.append(f"plots: {', '.join(pngs)}")
    return "\n".join(out) + "\n"
