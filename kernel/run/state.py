"""Object state without pickle: a graph of Python objects as a flat table the codec can encode,
and back, importing nothing outside an allow-list and evaluating nothing.

`dump(root, ...)` numbers every composite object it reaches (breadth first, so the table is the
same for the same graph) and writes each as one entry, a list `[tag, ...]` whose children are
either inline scalars (None, bool, int, float, str, bytes, numpy scalars) or references `[i]`
to other entries. Sharing and cycles survive (one entry per object), and the codec only ever
sees shallow lists, so no object graph exceeds its depth limit.

What can be saved: the codec's scalars, numpy arrays, torch tensors, lists, tuples, dicts (in
insertion order, any hashable keys), sets, frozensets, deques, OrderedDicts, defaultdicts,
bytearrays, big ints, complex, ranges, numpy dtypes, `Message`s, numpy `Generator`s and bit
generators (by state), enum members, named tuples, instances of classes (their `__dict__` and
`__slots__`, frozen dataclasses included), classes and functions by their importable name,
bound methods and `functools.partial`s.

Configuration is found again rather than saved: `Fresh` holds freshly built counterparts of
the saved objects (nodes made by a deployment built anew from the same config). An object that
is the very object its fresh counterpart at the same place holds (or that a fresh node reaches
through its attributes) is one the process keeps across builds, such as a learner cached per
config; it is written as a path into the fresh nodes (`[node, "a", attr, "k", key, ...]`) and
read back from the loading process's fresh nodes. A closure that is not importable is taken
from its fresh counterpart when that runs the same code on equal captured values. Everything
else is saved by value, state that `build` shares between nodes included.

On loading, an instance is restored into its fresh counterpart in place (same class, not
claimed by another entry), so objects the loading deployment shares between its nodes and its
`make_node` stay shared with what was restored; otherwise it is made with `cls.__new__`.

`load(tree, ...)` imports classes and functions only from modules under the `allowed` prefixes
(plus builtin and numpy scalar types); anything else, a malformed entry or a path the fresh
nodes lack raises `StateError` naming it. Arrays come back as writable copies.
"""

from __future__ import annotations

import enum
import functools
import types
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import import_module
from typing import Any

import numpy as np

from kernel.messages import Message

__all__ = ["Fresh", "StateError", "dump", "load"]


class StateError(ValueError):
    """An object cannot be saved, or a saved table cannot be read back; says which and why."""


_INLINE = (type(None), bool, int, float, str, bytes)
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_NONE: Any = object()  # "no fresh counterpart"
_UNSET: Any = object()
_BUSY: Any = object()
_SCALAR_KINDS = "biufc"
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
_SAFE_BUILTINS = frozenset({
    "int", "float", "str", "bytes", "bool", "complex", "list", "tuple", "dict", "set",
    "frozenset", "bytearray", "object", "range", "slice",
})
_MAX_INT_DIGITS = 4000
Path = tuple[Any, ...]  # a path into the fresh nodes: (node, "a", name, "k", key, "i", index, ...)


def typename(obj: Any) -> str:
    """`module:qualname` of `obj`'s class."""
    t = type(obj)
    return f"{t.__module__}:{t.__qualname__}"


def module_allowed(module: str, allowed: Iterable[str]) -> bool:
    """Whether `module` is one of `allowed` or under one of them (entries ending in "." are
    prefixes, others exact module names)."""
    for a in allowed:
        if module == a or (a.endswith(".") and module.startswith(a)) or module == a.rstrip("."):
            return True
    return False


# -- fresh counterparts ----------------------------------------------------------------------

class Fresh:
    """Freshly built counterparts of live objects: `root(key)` (made by `make(key)` on first use,
    for a key of `keys`: node ids) corresponds to the live object a dump anchors to `key`;
    `index` finds any object a fresh root reaches through at most `depth` attribute steps, so
    identity with configuration is recognised anywhere."""

    def __init__(self, make: Callable[[int], Any], keys: Iterable[int], depth: int = 2) -> None:
        self.make = make
        self.keys = sorted(keys)
        self._known = frozenset(self.keys)
        self.depth = depth
        self._roots: dict[int, Any] = {}
        self._index: dict[int, Path] | None = None

    def has(self, key: Any) -> bool:
        """Whether `key` names a fresh root."""
        return type(key) is int and key in self._known

    def root(self, key: int) -> Any:
        """The fresh counterpart of node `key` (made now if not yet)."""
        try:
            return self._roots[key]
        except KeyError:
            obj = self._roots[key] = self.make(key)
            return obj

    @property
    def index(self) -> dict[int, Path]:
        if self._index is None:
            self._index = {}
            frontier: list[tuple[Any, Path]] = [(self.root(k), (k,)) for k in self.keys]
            for _ in range(self.depth + 1):
                nxt: list[tuple[Any, Path]] = []
                for obj, path in frontier:
                    if type(obj) in _INLINE or isinstance(obj, tuple | frozenset | np.generic):
                        continue
                    if id(obj) in self._index:
                        continue
                    self._index[id(obj)] = path
                    for name, value in _fields(obj):
                        nxt.append((value, (*path, "a", name)))
                frontier = nxt
        return self._index

    def resolve(self, path: Sequence[Any]) -> Any:
        """The fresh object at `path`; StateError when it is not there."""
        if not path or not self.has(path[0]):
            raise StateError(f"the checkpoint refers to a configuration object of node "
                             f"{path[0] if path else '?'}, which a fresh deployment does not "
                             f"have")
        obj = self.root(path[0])
        if len(path) % 2 != 1:
            raise StateError(f"malformed path {list(path)!r} into the fresh nodes")
        for i in range(1, len(path), 2):
            how, step = path[i], path[i + 1]
            try:
                if how == "a" and type(step) is str:
                    obj = getattr(obj, step)
                elif how in ("k", "i"):
                    obj = obj[step]
                else:
                    raise StateError(f"malformed step {how!r} in path {list(path)!r}")
            except (AttributeError, KeyError, IndexError, TypeError):
                raise StateError(f"the checkpoint refers to {_render_path(path[: i + 2])} of a "
                                 f"freshly built node, which is not there (a different "
                                 f"config or protocol version?)") from None
        return obj


def _render_path(path: Sequence[Any]) -> str:
    out = f"node {path[0]}" if path else "?"
    for i in range(1, len(path) - 1, 2):
        how, step = path[i], path[i + 1]
        out += f".{step}" if how == "a" else f"[{step!r}]"
    return out


def _fields(obj: Any) -> list[tuple[str, Any]]:
    """An instance's attributes: its `__dict__` in order, then set `__slots__` along the MRO."""
    out: list[tuple[str, Any]] = []
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict) and not isinstance(obj, type):
        out.extend(d.items())
    seen = {name for name, _ in out}
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        if isinstance(slots, str):
            slots = (slots,)
        for s in slots:
            if s in ("__dict__", "__weakref__"):
                continue
            name = f"_{cls.__name__.lstrip('_')}{s}" if s.startswith("__") and not s.endswith(
                "__") else s
            if name in seen:
                continue
            try:
                value = object.__getattribute__(obj, name)
            except AttributeError:
                continue
            seen.add(name)
            out.append((name, value))
    return out


def _same_config(a: Any, b: Any, depth: int = 6) -> bool:
    """Whether `a` (live) and `b` (fresh) are the same configuration: the same object, equal
    scalars, or containers, arrays, functions and instances made of such."""
    if a is b:
        return True
    if type(a) is not type(b) or depth <= 0:
        return False
    t = type(a)
    if t in _INLINE or isinstance(a, np.generic | complex):
        return bool(a == b) or (a != a and b != b)
    if t in (list, tuple):
        return len(a) == len(b) and all(_same_config(x, y, depth - 1) for x, y in zip(a, b))
    if t is dict:
        return list(a) == list(b) and all(_same_config(a[k], b[k], depth - 1) for k in a)
    if t in (set, frozenset):
        return bool(a == b)
    if t is np.ndarray:
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if t is types.FunctionType:
        return _same_function(a, b, depth)
    if t is types.MethodType:
        return a.__func__ is b.__func__ and _same_config(a.__self__, b.__self__, depth - 1)
    if isinstance(a, functools.partial):
        return (_same_config(a.func, b.func, depth - 1)
                and _same_config(a.args, b.args, depth - 1)
                and _same_config(a.keywords, b.keywords, depth - 1))
    fa, fb = _fields(a), _fields(b)
    return bool(fa) and [n for n, _ in fa] == [n for n, _ in fb] and all(
        _same_config(x, y, depth - 1) for (_, x), (_, y) in zip(fa, fb))


def _same_function(a: types.FunctionType, b: types.FunctionType, depth: int) -> bool:
    if a.__code__ is not b.__code__:
        return False
    if not _same_config(a.__defaults__, b.__defaults__, depth - 1):
        return False
    if not _same_config(a.__kwdefaults__, b.__kwdefaults__, depth - 1):
        return False
    ca, cb = a.__closure__ or (), b.__closure__ or ()
    if len(ca) != len(cb):
        return False
    for x, y in zip(ca, cb):
        try:
            vx = x.cell_contents
        except ValueError:
            vx = _UNSET
        try:
            vy = y.cell_contents
        except ValueError:
            vy = _UNSET
        if not _same_config(vx, vy, depth - 1):
            return False
    return True


def _qualref(obj: Any) -> str | None:
    """"module:qualname" when importing that name gives `obj` back, else None."""
    module = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qual, str) or "<" in qual:
        return None
    try:
        found: Any = import_module(module)
        for part in qual.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qual}" if found is obj else None


def _safe_global(obj: Any, module: str) -> bool:
    """Builtin and numpy scalar types are referable without being under `allowed`."""
    if module == "builtins":
        return isinstance(obj, type) and obj.__name__ in _SAFE_BUILTINS
    if module == "numpy":
        return isinstance(obj, type) and issubclass(obj, np.generic)
    return False


# -- dumping ---------------------------------------------------------------------------------

class _Dumper:
    def __init__(self, fresh: Fresh | None, anchors: Mapping[int, int],
                 allowed: Sequence[str]) -> None:
        self.fresh = fresh
        self.anchors = anchors
        self.allowed = tuple(allowed)
        self.objs: list[Any] = []
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # holds every numbered object, so no id is reused
        # Where each entry was first reached, (parent entry, step), for error messages only:
        # a step is ".name", an index or key, or ("key", k) for a dict key itself.
        self.parents: list[tuple[int, Any]] = []
        self.labels: dict[int, str] = {}  # entries that are a node's protocol object
        self.queue: deque[tuple[int, Any, Any, Path | None]] = deque()

    def ref(self, obj: Any, cp: Any, path: Path | None, parent: int, step: Any) -> Any:
        t = type(obj)
        if t in _INLINE:
            if t is not int or _INT_MIN <= obj <= _INT_MAX:
                return obj
        elif isinstance(obj, np.generic) and obj.dtype.kind in _SCALAR_KINDS:
            return obj
        idx = self.memo.get(id(obj))
        if idx is not None:
            return [idx]
        idx = len(self.objs)
        self.memo[id(obj)] = idx
        self.keep.append(obj)
        self.objs.append(None)
        self.parents.append((parent, step))
        self.queue.append((idx, obj, cp, path))
        return [idx]

    def run(self, root: Any) -> dict[str, Any]:
        r = self.ref(root, _NONE, None, -1, "state")
        while self.queue:
            idx, obj, cp, path = self.queue.popleft()
            self.objs[idx] = self.entry(idx, obj, cp, path)
        return {"objs": self.objs, "root": r}

    def where(self, idx: int) -> str:
        steps: list[str] = []
        while idx >= 0:
            label = self.labels.get(idx)
            if label is not None:
                steps.append(label)
                break
            idx, step = self.parents[idx]
            if type(step) is tuple:
                steps.append(f" key {step[1]!r}")
            elif type(step) is str and (step.startswith(".") or idx < 0):
                steps.append(step)
            else:
                steps.append(f"[{step!r}]")
        return "".join(reversed(steps))

    def fail(self, idx: int, why: str) -> StateError:
        return StateError(f"cannot save {self.where(idx)}: {why}")

    def entry(self, idx: int, obj: Any, cp: Any, path: Path | None) -> list[Any]:
        fresh = self.fresh
        if fresh is not None:
            key = self.anchors.get(id(obj))
            if key is not None and fresh.has(key):
                cp, path = fresh.root(key), (key,)
                self.labels[idx] = f"node {key}"
            if path is not None and obj is cp and not isinstance(obj, tuple | frozenset):
                return ["f", typename(obj), *path]
            found = fresh.index.get(id(obj))
            if found is not None and not isinstance(obj, tuple | frozenset):
                return ["f", typename(obj), *found]
        t = type(obj)
        ref = self.ref
        if t is Message:
            return ["M", *[ref(v, _NONE, None, idx, "." + f)
                           for f, v in zip(Message._fields, obj)]]
        if t is list or t is tuple:
            tag = "l" if t is list else "t"
            if path is None or type(cp) is not t:
                return [tag, *[ref(v, _NONE, None, idx, i) for i, v in enumerate(obj)]]
            n = len(cp)
            return [tag, *[ref(v, cp[i], (*path, "i", i), idx, i) if i < n
                           else ref(v, _NONE, None, idx, i) for i, v in enumerate(obj)]]
        if t is dict or t is OrderedDict or t is defaultdict:
            head: list[Any] = ["d"] if t is dict else ["od"] if t is OrderedDict else [
                "dd", ref(obj.default_factory, _NONE, None, idx, ".default_factory")]
            same = path is not None and type(cp) is t
            for k, v in obj.items():
                head.append(ref(k, _NONE, None, idx, ("key", k)))
                if same and type(k) in _INLINE and k in cp:
                    head.append(ref(v, cp[k], (*path, "k", k), idx, k))  # type: ignore[misc]
                else:
                    head.append(ref(v, _NONE, None, idx, k))
            return head
        if t is set or t is frozenset:
            # In iteration order: rebuilding by inserting in that order keeps it.
            return ["s" if t is set else "fs", *[ref(v, _NONE, None, idx, ("key", v))
                                                 for v in obj]]
        if t is deque:
            return ["dq", obj.maxlen, *[ref(v, _NONE, None, idx, i) for i, v in enumerate(obj)]]
        if t is np.ndarray:
            if obj.dtype.kind not in _SCALAR_KINDS:
                raise self.fail(idx, f"an array of dtype {obj.dtype} (only bool, integer, "
                                     f"float and complex arrays can be saved)")
            return ["a", np.ascontiguousarray(obj)]
        if t is int:
            return ["i", str(obj)]
        if t is complex:
            return ["c", obj.real, obj.imag]
        if t is bytearray:
            return ["ba", bytes(obj)]
        if t is range:
            return ["rg", obj.start, obj.stop, obj.step]
        if isinstance(obj, np.dtype):
            if obj.hasobject:
                raise self.fail(idx, f"dtype {obj} holds Python objects")
            return ["dt", obj.str]
        if isinstance(obj, np.random.Generator):
            bg = obj.bit_generator
            return ["g", type(bg).__name__, ref(bg.state, _NONE, None, idx, ".state")]
        if isinstance(obj, np.random.BitGenerator):
            if type(obj).__name__ not in _BIT_GENERATORS:
                raise self.fail(idx, f"bit generator {typename(obj)} is not one of "
                                     f"{', '.join(_BIT_GENERATORS)}")
            return ["bg", type(obj).__name__, ref(obj.state, _NONE, None, idx, ".state")]
        if t is types.MethodType:
            name = obj.__func__.__name__
            if getattr(obj.__self__, name, None) != obj:
                raise self.fail(idx, f"bound method {obj!r} is not reachable as .{name} of "
                                     f"its object")
            return ["m", ref(obj.__self__, _NONE, None, idx, ".__self__"), name]
        if t is functools.partial:
            return ["p", ref(obj.func, _NONE, None, idx, ".func"),
                    ref(obj.args, _NONE, None, idx, ".args"),
                    ref(obj.keywords, _NONE, None, idx, ".keywords")]
        if t is types.FunctionType or t is types.BuiltinFunctionType or isinstance(obj, type):
            name = _qualref(obj)
            if name is not None:
                module = name.partition(":")[0]
                if module_allowed(module, self.allowed) or _safe_global(obj, module):
                    return ["fn", name]
            if (t is types.FunctionType and path is not None
                    and type(cp) is types.FunctionType and _same_function(obj, cp, 6)):
                return ["f", typename(obj), *path]
            if name is None:
                why = ("a closure or lambda that a freshly built node does not hold with the "
                       "same code and captured values")
            else:
                why = f"{name} is not under the allowed modules ({', '.join(self.allowed)})"
            raise self.fail(idx, why)
        if isinstance(obj, enum.Enum):
            return ["E", ref(type(obj), _NONE, None, idx, ".__class__"), obj.name]
        if _is_tensor(obj):
            t_obj = obj.detach()
            if t_obj.device.type != "cpu" or t_obj.is_sparse:
                raise self.fail(idx, "a torch tensor that is not dense on the CPU")
            return ["T", t_obj.contiguous(), bool(obj.requires_grad)]
        if isinstance(obj, tuple) and hasattr(t, "_fields"):
            return ["nt", ref(t, _NONE, None, idx, ".__class__"),
                    *[ref(v, _NONE, None, idx, i) for i, v in enumerate(obj)]]
        if isinstance(obj, list | dict | set | tuple | frozenset | np.ndarray):
            raise self.fail(idx, f"a {typename(obj)} (a subclass of a container; only the "
                                 f"plain types, OrderedDict, defaultdict and named tuples "
                                 f"can be saved)")
        return self.instance(idx, obj, cp, path)

    def instance(self, idx: int, obj: Any, cp: Any, path: Path | None) -> list[Any]:
        cls = type(obj)
        name = _qualref(cls)
        if name is None:
            raise self.fail(idx, f"an instance of {typename(obj)}, a class that cannot be "
                                 f"imported by that name")
        if not module_allowed(cls.__module__, self.allowed):
            raise self.fail(idx, f"an instance of {name}, outside the allowed modules "
                                 f"({', '.join(self.allowed)}); objects of other libraries "
                                 f"are saved only when a freshly built node holds the same "
                                 f"object")
        if not hasattr(obj, "__dict__") and not any(
                c.__dict__.get("__slots__") for c in cls.__mro__):
            raise self.fail(idx, f"an instance of {name} has neither __dict__ nor __slots__")
        same = path is not None and type(cp) is cls
        out: list[Any] = ["o", name, list(path) if same else None]  # type: ignore[arg-type]
        for field, value in _fields(obj):
            fcp = getattr(cp, field, _NONE) if same else _NONE
            fpath = (*path, "a", field) if fcp is not _NONE else None  # type: ignore[misc]
            out.append(field)
            out.append(self.ref(value, fcp, fpath, idx, "." + field))
        return out


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach") and hasattr(
        obj, "requires_grad")


def dump(root: Any, *, fresh: Fresh | None = None, anchors: Mapping[int, int] | None = None,
         allowed: Sequence[str] = ()) -> dict[str, Any]:
    """`root` as {"objs": [entry, ...], "root": child}: what `load` reads back. `anchors`
    maps `id(live object)` to the key of its fresh counterpart, `fresh.root(key)`."""
    return _Dumper(fresh, anchors or {}, allowed).run(root)


# -- loading ---------------------------------------------------------------------------------

_SHELLS = frozenset({"l", "d", "od", "dd", "s", "dq", "o", "g", "bg", "p", "ba", "a", "T"})


class _Loader:
    def __init__(self, tree: Any, fresh: Fresh | None, allowed: Sequence[str]) -> None:
        if type(tree) is not dict or type(tree.get("objs")) is not list or "root" not in tree:
            raise StateError("state table must be a dict with 'objs' (a list) and 'root'")
        self.objs: list[Any] = tree["objs"]
        self.root = tree["root"]
        self.fresh = fresh
        self.allowed = tuple(allowed)
        self.out: list[Any] = [_UNSET] * len(self.objs)
        self.fills: deque[int] = deque()  # lists, instances, deques: filled first
        self.late: deque[Callable[[], None]] = deque()  # dicts and sets: keys hash then
        self.last: list[Callable[[], None]] = []  # generators, partials: need filled dicts
        self.claimed: set[int] = set()  # fresh objects already restored into

    def run(self) -> Any:
        root = self.val(self.root)
        while self.fills or self.late:
            if self.fills:
                self.fill(self.fills.popleft())
            else:
                self.late.popleft()()
        for fn in self.last:
            fn()
        return root

    def bad(self, idx: int, why: str) -> StateError:
        entry = self.objs[idx]
        tag = entry[0] if type(entry) is list and entry else entry
        return StateError(f"state entry {idx} ({tag!r}): {why}")

    def val(self, x: Any) -> Any:
        if type(x) is list:
            if len(x) != 1 or type(x[0]) is not int:
                raise StateError(f"malformed reference {x!r}; expected [entry index]")
            return self.get(x[0])
        if type(x) in _INLINE or isinstance(x, np.generic):
            return x
        raise StateError(f"unexpected {typename(x)} where a scalar or a reference belongs")

    def get(self, idx: int) -> Any:
        if not 0 <= idx < len(self.objs):
            raise StateError(f"reference to entry {idx}; the table has {len(self.objs)}")
        o = self.out[idx]
        if o is _BUSY:
            raise self.bad(idx, "refers to itself through immutable objects only")
        if o is not _UNSET:
            return o
        e = self.objs[idx]
        if type(e) is not list or not e or type(e[0]) is not str:
            raise StateError(f"state entry {idx} is {typename(e)}; expected [tag, ...]")
        tag = e[0]
        if tag in _SHELLS:
            shell = self.shell(idx, tag, e)
            self.out[idx] = shell
            return shell
        self.out[idx] = _BUSY
        try:
            v = self.build(idx, tag, e)
        except StateError:
            raise
        except Exception as exc:
            raise self.bad(idx, f"{type(exc).__name__}: {exc}") from None
        self.out[idx] = v
        return v

    def need(self, idx: int, e: list[Any], n: int, exact: bool = True) -> None:
        if (len(e) != n) if exact else (len(e) < n):
            raise self.bad(idx, f"has {len(e)} fields; expected {n}{'' if exact else '+'}")

    def import_global(self, name: Any, idx: int) -> Any:
        if type(name) is not str or name.count(":") != 1:
            raise self.bad(idx, f"global name {name!r} is not 'module:qualname'")
        module, qual = name.split(":")
        safe = module in ("builtins", "numpy")
        if not safe and not module_allowed(module, self.allowed):
            raise self.bad(idx, f"refuses to import {name}: module {module!r} is not under "
                                f"the allowed ones ({', '.join(self.allowed)})")
        try:
            obj: Any = import_module(module)
            for part in qual.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise self.bad(idx, f"cannot import {name}: {exc}") from None
        if safe and not _safe_global(obj, module):
            raise self.bad(idx, f"refuses {name}: only builtin and numpy scalar types are "
                                f"allowed from {module!r}")
        return obj

    def shell(self, idx: int, tag: str, e: list[Any]) -> Any:
        if tag == "l":
            self.fills.append(idx)
            return []
        if tag in ("d", "od", "s"):
            obj: Any = {} if tag == "d" else OrderedDict() if tag == "od" else set()
            self.late.append(lambda: self.fill_late(idx, obj))
            return obj
        if tag == "dd":
            self.need(idx, e, 2, exact=False)
            dd: defaultdict[Any, Any] = defaultdict()
            self.late.append(lambda: self.fill_late(idx, dd))
            return dd
        if tag == "dq":
            self.need(idx, e, 2, exact=False)
            maxlen = e[1]
            if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
                raise self.bad(idx, f"deque maxlen {maxlen!r}")
            self.fills.append(idx)
            return deque(maxlen=maxlen)
        if tag == "o":
            self.need(idx, e, 3, exact=False)
            if len(e) % 2 == 0:
                raise self.bad(idx, "fields must come in name, value pairs")
            cls = self.import_global(e[1], idx)
            if not isinstance(cls, type):
                raise self.bad(idx, f"{e[1]} is not a class")
            inst = self.counterpart(e[2], cls)
            if inst is None:
                try:
                    inst = cls.__new__(cls)  # type: ignore[call-overload]
                except Exception as exc:
                    raise self.bad(idx, f"cannot make a {e[1]}: {exc}") from None
            self.fills.append(idx)
            return inst
        if tag in ("g", "bg"):
            self.need(idx, e, 3)
            name = e[1]
            if name not in _BIT_GENERATORS:
                raise self.bad(idx, f"bit generator {name!r} is not one of "
                                    f"{', '.join(_BIT_GENERATORS)}")
            bg = getattr(np.random, name)(0)
            state = self.val(e[2])

            def set_state() -> None:
                try:
                    bg.state = state
                except Exception as exc:
                    raise self.bad(idx, f"bad {name} state: {exc}") from None

            self.last.append(set_state)
            return np.random.Generator(bg) if tag == "g" else bg
        if tag == "p":
            self.need(idx, e, 4)
            part = functools.partial(_unset_partial)
            func, args, kw = self.val(e[1]), self.val(e[2]), self.val(e[3])

            def set_partial() -> None:
                if not callable(func) or type(args) is not tuple or type(kw) is not dict:
                    raise self.bad(idx, "partial needs a callable, a tuple and a dict")
                part.__setstate__((func, args, dict(kw), None))  # type: ignore[attr-defined]

            self.last.append(set_partial)
            return part
        if tag == "ba":
            self.need(idx, e, 2)
            if type(e[1]) is not bytes:
                raise self.bad(idx, "bytearray content must be bytes")
            return bytearray(e[1])
        if tag == "a":
            self.need(idx, e, 2)
            if type(e[1]) is not np.ndarray:
                raise self.bad(idx, f"expected an array, got {typename(e[1])}")
            return np.array(e[1], copy=True)
        # "T": a torch tensor
        self.need(idx, e, 3)
        t = e[1]
        if not _is_tensor(t) or type(e[2]) is not bool:
            raise self.bad(idx, f"expected a torch tensor and a flag, got {typename(t)}")
        t = t.clone()
        if e[2]:
            t.requires_grad_(True)
        return t

    def counterpart(self, path: Any, cls: type) -> Any:
        """The fresh object at `path` to restore into, or None (no fresh nodes, no such path,
        another class, or already restored into for another entry)."""
        if path is None or self.fresh is None:
            return None
        if type(path) is not list:
            raise StateError(f"malformed path {path!r} into the fresh nodes")
        try:
            obj = self.fresh.resolve(path)
        except StateError:
            return None
        if type(obj) is not cls or id(obj) in self.claimed:
            return None
        self.claimed.add(id(obj))
        return obj

    def fill(self, idx: int) -> None:
        e, obj = self.objs[idx], self.out[idx]
        tag = e[0]
        if tag == "l":
            obj.extend(self.val(x) for x in e[1:])
        elif tag == "dq":
            obj.extend(self.val(x) for x in e[2:])
        else:  # "o"
            names = set()
            for i in range(3, len(e), 2):
                name = e[i]
                if type(name) is not str or not name.isidentifier():
                    raise self.bad(idx, f"field name {name!r} is not an identifier")
                names.add(name)
                try:
                    object.__setattr__(obj, name, self.val(e[i + 1]))
                except (AttributeError, TypeError) as exc:
                    raise self.bad(idx, f"cannot set {e[1]}.{name}: {exc}") from None
            # Restored in place: attributes the saved object did not have go.
            d = getattr(obj, "__dict__", None)
            if isinstance(d, dict):
                for name in [k for k in d if k not in names]:
                    del d[name]

    def fill_late(self, idx: int, obj: Any) -> None:
        e = self.objs[idx]
        tag = e[0]
        if tag == "s":
            items = [self.val(x) for x in e[1:]]
            self.last_insert(idx, lambda: obj.update(items))
            return
        start = 2 if tag == "dd" else 1
        if (len(e) - start) % 2:
            raise self.bad(idx, "keys and values must come in pairs")
        pairs = [(self.val(e[i]), self.val(e[i + 1])) for i in range(start, len(e), 2)]
        if tag == "dd":
            factory = self.val(e[1])
            if factory is not None and not callable(factory):
                raise self.bad(idx, f"default_factory {factory!r} is not callable")
            obj.default_factory = factory

        def insert() -> None:
            for k, v in pairs:
                obj[k] = v

        self.last_insert(idx, insert)

    def last_insert(self, idx: int, fn: Callable[[], None]) -> None:
        # Inserted once every list and instance is filled, so keys hash as they did; and
        # before generator states and partials, which read these dicts.
        def run() -> None:
            try:
                fn()
            except TypeError as exc:
                raise self.bad(idx, f"{exc}") from None

        self.late.append(run) if self.fills else run()

    def build(self, idx: int, tag: str, e: list[Any]) -> Any:
        if tag == "t":
            return tuple(self.val(x) for x in e[1:])
        if tag == "fs":
            return frozenset(self.val(x) for x in e[1:])
        if tag == "M":
            self.need(idx, e, 7)
            f = [self.val(x) for x in e[1:]]
            src, dst, kind, body, sent_at, seq = f
            if (type(src) is not int or type(dst) is not int or type(kind) is not str
                    or not isinstance(body, dict) or type(sent_at) is not float
                    or type(seq) is not int):
                raise self.bad(idx, "message fields have the wrong types")
            return tuple.__new__(Message, (src, dst, kind, body, sent_at, seq))
        if tag == "f":
            self.need(idx, e, 3, exact=False)
            if self.fresh is None:
                raise self.bad(idx, "refers to a fresh deployment, and none was given")
            obj = self.fresh.resolve(e[2:])
            if typename(obj) != e[1]:
                raise StateError(f"the checkpoint expects a {e[1]} at {_render_path(e[2:])} "
                                 f"of a freshly built node, which holds a {typename(obj)} "
                                 f"(a different config or protocol version?)")
            return obj
        if tag == "fn":
            self.need(idx, e, 2)
            return self.import_global(e[1], idx)
        if tag == "m":
            self.need(idx, e, 3)
            owner, name = self.val(e[1]), e[2]
            if type(name) is not str or not name.isidentifier():
                raise self.bad(idx, f"method name {name!r}")
            m = getattr(owner, name, None)
            if type(m) is not types.MethodType or m.__self__ is not owner:
                raise self.bad(idx, f"{typename(owner)} has no method {name!r}")
            return m
        if tag == "i":
            self.need(idx, e, 2)
            s = e[1]
            if type(s) is not str or len(s) > _MAX_INT_DIGITS or not s.lstrip("-").isdigit():
                raise self.bad(idx, "a big int must be a decimal string")
            return int(s)
        if tag == "c":
            self.need(idx, e, 3)
            return complex(float(e[1]), float(e[2]))
        if tag == "rg":
            self.need(idx, e, 4)
            if not all(type(x) is int for x in e[1:]):
                raise self.bad(idx, "range bounds must be integers")
            return range(e[1], e[2], e[3])
        if tag == "dt":
            self.need(idx, e, 2)
            dt = np.dtype(str(e[1]))
            if dt.hasobject:
                raise self.bad(idx, "object dtypes are refused")
            return dt
        if tag == "E":
            self.need(idx, e, 3)
            cls = self.val(e[1])
            if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
                raise self.bad(idx, "not an enum class")
            return cls[e[2]]
        if tag == "nt":
            self.need(idx, e, 2, exact=False)
            cls = self.val(e[1])
            if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_make")):
                raise self.bad(idx, "not a named tuple class")
            return cls._make(self.val(x) for x in e[2:])
        raise self.bad(idx, f"unknown tag {tag!r}")


def _unset_partial(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a partial read back from a checkpoint was called before it was set up")


def load(tree: Any, *, fresh: Fresh | None = None, allowed: Sequence[str] = ()) -> Any:
    """The object graph `dump` wrote; StateError when the table is malformed, names a module
    outside `allowed`, or a path `fresh` does not have."""
    try:
        return _Loader(tree, fresh, allowed).run()
    except RecursionError:
        raise StateError("state nests immutable objects too deeply") from None
