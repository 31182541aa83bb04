"""What a run leaves on disk: metrics.jsonl, result.json, final_model.npz, config.toml (each
written atomically, never through a symlink, without secrets); the record a failed or
interrupted run leaves (`MetricsStream`); and the canonical model hash that says two runs
ended with the same model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from kernel.run.config import dumps as toml_dumps
from kernel.run.files import open_atomic, write_atomic

FILES = ("metrics.jsonl", "result.json", "final_model.npz", "config.toml")
# Arrays larger than this in a metric row or a result's extra fields are summarised (shape,
# dtype) instead of listed: result.json stays small when a protocol returns whole vectors.
MAX_LISTED_ELEMENTS = 10_000
# Metric fields that read the wall clock: the only ones allowed to differ between equal runs.
WALL_FIELDS = ("wall_s",)


def read_metrics(path: str | Path, *, drop_wall: bool = False) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file, without the wall-clock fields when `drop_wall`."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    if drop_wall:
        for row in rows:
            for key in WALL_FIELDS:
                row.pop(key, None)
    return rows


def as_array(x: Any) -> np.ndarray:
    """`x` as a numpy array; torch tensors are detached and moved to the CPU (torch is not
    imported here: anything with `.detach()` and `.numpy()` counts)."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def named_arrays(model: Any) -> dict[str, np.ndarray]:
    """A result's "model" as {name: numpy array}; a bare array becomes {"model": array}."""
    if isinstance(model, Mapping):
        out = {}
        for name, value in model.items():
            if not isinstance(name, str):
                raise TypeError(
                    f"model parameter names must be strings; got {name!r} ({type(name).__name__})"
                )
            out[name] = as_array(value)
        return out
    return {"model": as_array(model)}


def model_sha256(named: Mapping[str, Any]) -> str:
    """The hex sha256 of a named set of arrays, independent of dict order, memory layout and
    byte order: for each name in sorted order, a length-prefixed JSON header
    `[name, dtype (little-endian str), shape]` then the array's little-endian C-order bytes,
    length-prefixed."""
    h = hashlib.sha256()
    arrays = named_arrays(named)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        if a.dtype.hasobject:
            raise TypeError(f"model parameter {name!r} has dtype object; expected numeric arrays")
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not _LITTLE):
            a = a.astype(a.dtype.newbyteorder("<"))
        header = json.dumps([name, a.dtype.str, list(a.shape)]).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(a.nbytes.to_bytes(8, "little"))
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


_LITTLE = np.little_endian


def jsonable(x: Any) -> Any:
    """`x` as plain JSON types: numpy and torch scalars and arrays become numbers and lists
    (large arrays a {"shape", "dtype"} summary), bytes hex, tuples lists, keys strings."""
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float):
        return x
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, bytes | bytearray | memoryview):
        return bytes(x).hex()
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, np.ndarray) or (hasattr(x, "detach") and hasattr(x, "numpy")):
        a = as_array(x)
        if a.ndim == 0:
            return jsonable(a.item())
        if a.size > MAX_LISTED_ELEMENTS:
            return {"shape": list(a.shape), "dtype": a.dtype.str}
        return jsonable(a.tolist())
    if hasattr(x, "isoformat"):
        return x.isoformat()
    return repr(x)


def dump_json(obj: Any, **kwargs: Any) -> str:
    """Stable JSON text with sorted keys. NaN and infinities stay as Python writes them (NaN,
    Infinity), which `json.loads` reads back; null would lose which one it was."""
    return json.dumps(jsonable(obj), sort_keys=True, **kwargs)


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An .npz that `np.load` reads, written byte-for-byte the same for the same arrays: members
    in sorted name order, uncompressed, with a fixed timestamp (np.savez stamps the time).
    Written to a temporary file and renamed over `path`."""
    with open_atomic(path) as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED,
                                                    allowZip64=True) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                npy_format.write_array(f, np.asarray(arrays[name]), allow_pickle=False)


# Keys never written to config.toml, in any section: a token given on the command line must
# not land on disk (and one from a config file is in that file already).
SECRET_KEYS = frozenset({"token", "password", "secret"})


def without_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` without SECRET_KEYS at any depth."""
    return {k: without_secrets(v) if isinstance(v, Mapping) else v
            for k, v in config.items() if k not in SECRET_KEYS}


def write_outputs(
    out_dir: str | Path,
    config: Mapping[str, Any],
    result: Mapping[str, Any],
    metrics_rows: Iterable[Mapping[str, Any]],
    model: Mapping[str, Any] | None,
    *,
    save_model: bool = True,
) -> list[Path]:
    """Write the run's files into `out_dir` (made if missing; files of an earlier run there are
    replaced) and return their paths. Each file is written to a temporary name and renamed, so
    a symlink planted at its name is replaced, never written through, and a reader never sees
    half a file. No model (a run nobody finished) writes no npz, and a stale one from an
    earlier run is removed so the directory never mixes two runs. config.toml leaves out
    secrets (SECRET_KEYS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "metrics.jsonl"
    write_atomic(path, (dump_json(row) + "\n" for row in metrics_rows))
    written.append(path)
    path = out / "result.json"
    write_atomic(path, [dump_json(result, indent=2), "\n"])
    written.append(path)
    path = out / "final_model.npz"
    if model is not None and save_model:
        write_npz(path, named_arrays(model))
        written.append(path)
    else:
        path.unlink(missing_ok=True)
    path = out / "config.toml"
    write_atomic(path, [toml_dumps(without_secrets(config))])
    written.append(path)
    return written


class MetricsStream:
    """metrics.jsonl written as rows arrive (for transports without checkpoints), so a run
    that dies keeps what it had; and the result.json of a run that failed or was interrupted."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.started = False
        self.rows: list[dict[str, Any]] = []
        self._file: Any = None
        self._streaming = False
        self.config: Mapping[str, Any] = {}

    def begin(self, config: Mapping[str, Any], streaming: bool) -> None:
        """The run of (validated) `config` starts: from now on a failure is recorded; with
        `streaming`, rows go to metrics.jsonl as they come (a new file: a symlink there is
        replaced, not followed)."""
        self.started = True
        self.config = config
        self._streaming = streaming
        if streaming:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / "metrics.jsonl", [])
            fd = os.open(self.out / "metrics.jsonl",
                         os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
            self._file = os.fdopen(fd, "w", encoding="utf-8")

    def row(self, row: dict[str, Any]) -> None:
        """One metric row (already plain)."""
        self.rows.append(row)
        if self._file is not None:
            self._file.write(dump_json(row) + "\n")
            self._file.flush()

    def fail(self, exc: BaseException) -> None:
        """Write result.json (and, unless streamed, metrics.jsonl) for a run that ended by
        `exc`. Never raises: the original error is what the user must see."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        message = str(exc) or type(exc).__name__
        cfg = self.config
        done = [r.get("value") for r in self.rows if r.get("name") == "round"]
        result = {
            "protocol": cfg.get("protocol", {}).get("name"),
            "transport": cfg.get("transport", {}).get("kind", "inproc"),
            "seed": cfg.get("run", {}).get("seed"),
            "rounds": done[-1] if done else 0,
            "reason": "interrupted" if interrupted else f"failed: {message.splitlines()[0]}",
            "error": None if interrupted else f"{type(exc).__name__}: {message}",
            "final_model_sha256": None,
        }
        with contextlib.suppress(Exception):
            self.close()
            if not self._streaming:
                write_atomic(self.out / "metrics.jsonl",
                             [dump_json(r) + "\n" for r in self.rows])
            write_atomic(self.out / "result.json", [dump_json(result, indent=2), "\n"])

    def close(self) -> None:
        """Close metrics.jsonl (write_outputs then rewrites it whole)."""
        if self._file is not None:
            self._file.close()
            self._file = None
