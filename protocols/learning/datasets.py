"""Datasets as whole arrays, loaded once per process; a client is an index array into them.

`[data] dataset` names one of:

- `digits`: scikit-learn's bundled 1,797 8x8 digit images (x [N, 1, 8, 8] scaled to [0, 1]);
  nothing is downloaded.
- `npz:PATH`: a numpy .npz with arrays `x` and `y`, optionally `group` (one int per sample,
  for the `natural` partition) and `x_test`/`y_test` (a test split). uint8 `x` is scaled by
  1/255. Paths (here and below) are relative to the current directory; `~` expands.
- `mnist:DIR`: the four IDX files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
  `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, `.gz` or not; a `.` instead of the
  second `-` is accepted) -> x [N, 1, 28, 28].
- `cifar10:DIR`: the binary version's `data_batch_1.bin` .. `data_batch_5.bin` and
  `test_batch.bin` (in DIR or DIR/cifar-10-batches-bin) -> x [N, 3, 32, 32]. Never pickles.
- `leaf:DIR`: LEAF's JSON (`DIR/train/*.json`, `DIR/test/*.json`; `users`, `user_data`);
  the writer/speaker of each sample is its `group`. FEMNIST's 784-value rows become
  [1, 28, 28] images; Shakespeare's strings become int64 character indices (LEAF's alphabet).
- `module:function` (declared with `@declare("datasets")`): returns `(x, y)`, or a dict with
  `x`, `y` and optionally `group`, `x_test`, `y_test`, `classes`.

Labels are integers in [0, classes); `classes` is the largest label + 1 unless the dataset or
`[data] classes` says more. Any problem is one `DataError` naming the file and what was wrong.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernel.options import ConfigError

BUILTIN = ("mixture", "digits", "npz", "mnist", "cifar10", "leaf")
# LEAF's Shakespeare alphabet (leaf/models/utils/language_utils.py), index = token id.
LEAF_LETTERS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
                "abcdefghijklmnopqrstuvwxyz}")


class DataError(ConfigError):
    """A dataset file or array is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Dataset:
    """Whole arrays of one dataset: training pool, optional group column and test split."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: int
    group: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape."""
        return tuple(int(d) for d in self.x.shape[1:])


def load(spec: str, classes: int | None = None) -> Dataset:
    """The dataset `spec` names (see the module doc), loaded once per process."""
    kind, sep, arg = spec.partition(":")
    if kind in ("npz", "mnist", "cifar10", "leaf"):
        if not sep or not arg:
            raise ConfigError(f"[data] dataset = {spec!r}; expected '{kind}:PATH'")
        arg = os.path.abspath(os.path.expanduser(arg))  # cache key independent of the cwd
    return _load(kind if kind in BUILTIN else spec, arg if kind in BUILTIN else "", classes)


@functools.lru_cache(maxsize=4)
def _load(kind: str, arg: str, classes: int | None) -> Dataset:
    if kind == "digits":
        raw = digits()
    elif kind == "npz":
        raw = _npz(Path(arg))
    elif kind == "mnist":
        raw = _mnist(Path(arg))
    elif kind == "cifar10":
        raw = _cifar10(Path(arg))
    elif kind == "leaf":
        raw = _leaf(Path(arg))
    elif kind == "mixture":
        raise ConfigError("[data] dataset = 'mixture' is generated per client, not loaded")
    else:
        raw = _user(kind)
    name = kind if not arg else f"{kind}:{arg}"
    return _finish(name, raw, classes)


def _finish(name: str, raw: Mapping[str, Any], classes: int | None) -> Dataset:
    """Check shapes and labels of loaded arrays, convert them, and build the Dataset."""
    def arr(key: str) -> np.ndarray | None:
        v = raw.get(key)
        return None if v is None else np.asarray(v)

    x, y = arr("x"), arr("y")
    if x is None or y is None:
        raise DataError(f"dataset {name!r} gave no {'x' if x is None else 'y'} array")
    x, y = _x(name, "x", x), _labels(name, "y", y, len(x))
    xt, yt = arr("x_test"), arr("y_test")
    if (xt is None) != (yt is None):
        raise DataError(f"dataset {name!r} has {'x_test' if xt is not None else 'y_test'} "
                        f"without {'y_test' if xt is not None else 'x_test'}")
    if xt is not None and yt is not None:
        xt, yt = _x(name, "x_test", xt), _labels(name, "y_test", yt, len(xt))
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"dataset {name!r}: x_test samples have shape {xt.shape[1:]}; "
                            f"x samples have {x.shape[1:]}")
    top = max(int(y.max(initial=-1)), int(yt.max(initial=-1)) if yt is not None else -1) + 1
    declared = raw.get("classes", classes)
    if declared is not None:
        if top > int(declared):
            where = "y" if int(y.max(initial=-1)) >= int(declared) else "y_test"
            raise DataError(f"dataset {name!r}: label {top - 1} in {where} is out of range; "
                            f"expected labels in 0..{int(declared) - 1} ({declared} classes)")
        top = int(declared)
    group = arr("group")
    if group is not None:
        if group.shape != (len(y),) or group.dtype.kind not in "iu":
            raise DataError(f"dataset {name!r}: group has shape {group.shape} and dtype "
                            f"{group.dtype}; expected {len(y)} integers")
        group = group.astype(np.int64)
    return Dataset(name, x, y, max(top, 1), group, xt, yt)


def _x(name: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.ndim < 2 or len(x) == 0:
        raise DataError(f"dataset {name!r}: {key} has shape {x.shape}; expected [samples, ...] "
                        f"with at least one sample")
    if x.dtype == np.uint8:
        return (x.astype(np.float32) / np.float32(255)).reshape(x.shape)
    if x.dtype.kind in "iu":  # token ids (LEAF Shakespeare) stay integers
        return x.astype(np.int64)
    if x.dtype.kind != "f":
        raise DataError(f"dataset {name!r}: {key} has dtype {x.dtype}; expected numbers")
    return np.ascontiguousarray(x, np.float32)


def _labels(name: str, key: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.shape != (n,):
        raise DataError(f"dataset {name!r}: {key} has shape {y.shape}; expected ({n},), one "
                        f"label per sample")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"dataset {name!r}: {key} has dtype {y.dtype}; expected integer "
                            f"labels")
    y = y.astype(np.int64)
    if n and y.min() < 0:
        raise DataError(f"dataset {name!r}: label {int(y.min())} in {key} is out of range; "
                        f"expected labels >= 0")
    return y


# -- built-in formats ------------------------------------------------------------------------

def digits() -> dict[str, Any]:
    """scikit-learn's bundled digits as arrays (x [1797, 1, 8, 8] in [0, 1], y, classes)."""
    from sklearn.datasets import load_digits  # lazy: sklearn costs ~1 s to import

    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    return {"x": x, "y": d.target.astype(np.int64), "classes": 10}


def _npz(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"[data] dataset: npz file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataError(f"npz file {str(path)!r} has arrays {sorted(z.files)}; "
                                f"expected 'x' and 'y' (optionally 'group', 'x_test', 'y_test')")
            return {k: z[k] for k in ("x", "y", "group", "x_test", "y_test") if k in z.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"npz file {str(path)!r} cannot be read: {exc}") from None


def _find(folder: Path, names: list[str], what: str) -> Path:
    if not folder.is_dir():
        raise DataError(f"[data] dataset: folder {str(folder)!r} does not exist")
    for n in names:
        for cand in (folder / n, folder / (n + ".gz")):
            if cand.is_file():
                return cand
    raise DataError(f"{what}: none of {', '.join(names)} (or .gz) in {str(folder)!r}")


IDX_TYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"),
                             0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file (gzipped or not) whose magic number must say `ndim` dimensions."""
    try:
        opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"IDX file {str(path)!r} cannot be read: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES \
            or data[3] != ndim:
        got = data[:4].hex() if len(data) >= 4 else f"{len(data)} bytes"
        kind = data[2] if len(data) > 2 and data[2] in IDX_TYPES else 0x08
        raise DataError(f"IDX file {str(path)!r}: magic number {got}; expected "
                        f"0000{kind:02x}{ndim:02x} (an IDX file of {ndim} "
                        f"dimension{'s' * (ndim > 1)})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {str(path)!r} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != need:
        raise DataError(f"IDX file {str(path)!r}: header says shape {dims} ({need} bytes of "
                        f"data) but {len(data) - header} bytes follow it")
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


def _mnist(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split, key in (("train", ""), ("t10k", "_test")):
        ip = _find(folder, [f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"],
                   f"MNIST {split} images")
        lp = _find(folder, [f"{split}-labels-idx1-ubyte", f"{split}-labels.idx1-ubyte"],
                   f"MNIST {split} labels")
        images, labels = read_idx(ip, 3), read_idx(lp, 1)
        if len(images) != len(labels):
            raise DataError(f"MNIST: {str(ip)!r} has {len(images)} images but {str(lp)!r} "
                            f"has {len(labels)} labels")
        if labels.size and int(labels.max()) > 9:
            raise DataError(f"MNIST labels file {str(lp)!r}: label {int(labels.max())} at "
                            f"index {int(labels.argmax())} is out of range; expected 0..9")
        out["x" + key] = images[:, None, :, :]
        out["y" + key] = labels.astype(np.int64)
    out["classes"] = 10
    return out


CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: (images uint8 [n, 3, 32, 32], labels int64 [n])."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"CIFAR-10 file {str(path)!r} cannot be read: {exc}") from None
    whole, rest = divmod(len(data), CIFAR_RECORD)
    if rest or not whole:
        raise DataError(f"CIFAR-10 file {str(path)!r}: truncated record at byte offset "
                        f"{whole * CIFAR_RECORD} ({len(data)} bytes is not a whole number of "
                        f"{CIFAR_RECORD}-byte records)")
    recs = np.frombuffer(data, np.uint8).reshape(whole, CIFAR_RECORD)
    labels = recs[:, 0].astype(np.int64)
    if labels.max() > 9:
        i = int(np.argmax(labels > 9))
        raise DataError(f"CIFAR-10 file {str(path)!r}: label {int(labels[i])} in record {i} "
                        f"(byte offset {i * CIFAR_RECORD}) is out of range; expected 0..9")
    return recs[:, 1:].reshape(whole, 3, 32, 32), labels


def _cifar10(folder: Path) -> dict[str, Any]:
    if (folder / "cifar-10-batches-bin").is_dir():
        folder = folder / "cifar-10-batches-bin"
    if not folder.is_dir():
        raise DataError(f"[data] dataset: folder {str(folder)!r} does not exist")
    train = sorted(folder.glob("data_batch_*.bin"))
    test = folder / "test_batch.bin"
    if not train:
        raise DataError(f"CIFAR-10: no data_batch_*.bin in {str(folder)!r} (the binary "
                        f"version; the python pickles are never read)")
    parts = [read_cifar(p) for p in train]
    out: dict[str, Any] = {"x": np.concatenate([p[0] for p in parts]),
                           "y": np.concatenate([p[1] for p in parts]), "classes": 10}
    if test.is_file():
        out["x_test"], out["y_test"] = read_cifar(test)
    return out


def _leaf_split(folder: Path, users: dict[str, int]) -> tuple[list[Any], list[Any], list[int]]:
    xs: list[Any] = []
    ys: list[Any] = []
    gs: list[int] = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            names, data = doc["users"], doc["user_data"]
            for user in names:
                ud = data[user]
                if len(ud["x"]) != len(ud["y"]):
                    raise DataError(f"LEAF file {str(path)!r}: user {user!r} has {len(ud['x'])}"
                                    f" x and {len(ud['y'])} y")
                gid = users.setdefault(user, len(users))
                xs.extend(ud["x"])
                ys.extend(ud["y"])
                gs.extend([gid] * len(ud["y"]))
        except (OSError, ValueError) as exc:
            raise DataError(f"LEAF file {str(path)!r} cannot be read: {exc}") from None
        except (KeyError, TypeError) as exc:
            raise DataError(f"LEAF file {str(path)!r} lacks {exc} (expected 'users' and "
                            f"'user_data' with 'x' and 'y' per user)") from None
    return xs, ys, gs


def _leaf_arrays(xs: list[Any], ys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    if xs and isinstance(xs[0], str):  # Shakespeare: characters to LEAF's token ids
        table = {c: i for i, c in enumerate(LEAF_LETTERS)}
        x = np.array([[table.get(c, 0) for c in s] for s in xs], np.int64)
        y = np.array([table.get(c, 0) for c in ys], np.int64)
        return x, y
    x = np.asarray(xs, np.float32)
    if x.ndim == 2 and x.shape[1] == 784:  # FEMNIST rows are 28x28 images
        x = x.reshape(-1, 1, 28, 28)
    return x, np.asarray(ys, np.int64)


def _leaf(folder: Path) -> dict[str, Any]:
    if not (folder / "train").is_dir():
        raise DataError(f"LEAF dataset {str(folder)!r} has no train/ folder of JSON files")
    users: dict[str, int] = {}
    xs, ys, gs = _leaf_split(folder / "train", users)
    if not ys:
        raise DataError(f"LEAF dataset {str(folder)!r}: train/ holds no samples")
    x, y = _leaf_arrays(xs, ys)
    out: dict[str, Any] = {"x": x, "y": y, "group": np.array(gs, np.int64)}
    if (folder / "test").is_dir():
        txs, tys, _ = _leaf_split(folder / "test", dict(users))
        if tys:
            out["x_test"], out["y_test"] = _leaf_arrays(txs, tys)
    if xs and isinstance(xs[0], str):
        out["classes"] = len(LEAF_LETTERS)
    return out


def _user(name: str) -> dict[str, Any]:
    from protocols.learning.names import resolve

    fn = resolve("datasets", name, "[data] dataset",
                 ("mixture", "digits", "npz:PATH", "mnist:DIR", "cifar10:DIR", "leaf:DIR"))
    if not callable(fn):
        raise DataError(f"[data] dataset = {name!r} is {type(fn).__name__}; expected a "
                        f"function returning arrays")
    got = fn()
    if isinstance(got, tuple) and len(got) == 2:
        return {"x": got[0], "y": got[1]}
    if isinstance(got, Mapping):
        return dict(got)
    raise DataError(f"[data] dataset = {name!r} returned {type(got).__name__}; expected (x, y) "
                    f"or a dict with 'x' and 'y'")
