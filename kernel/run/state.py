"""Protocol state as plain data: a snapshot of live objects holds only scalars, strings,
bytes, arrays, lists, tuples, sets, dicts, messages and numpy generator states, never the name
of a class, function or module; restoring writes those values into objects freshly built from
the config, constructing nothing the snapshot names.

The rule (all a protocol author needs to know). Each live object is compared with its *fresh
counterpart*: the object at the same place in a node freshly made by the deployment's
`make_node` (before `on_start`), reached through the same attribute, list index or dict key.

- Plain values are saved as they are (numbers, strings, bytes, numpy arrays and scalars of
  bool/int/float/complex dtypes, None), and containers of them: list, tuple, dict (also
  OrderedDict; a defaultdict keeps its fresh counterpart's factory), set, frozenset, deque, as
  well as `Message`s and numpy `Generator`s / bit generators (by their state).
- An object that *is* its fresh counterpart (the process shares it across builds, such as a
  learner cached per config) is saved as "the fresh one": a marker, no content.
- Functions, methods, classes and partials must be the same configuration as their fresh
  counterpart (same code, equal defaults and captured values): they are kept, never saved.
- Any other instance is saved as its attributes (`__dict__` and `__slots__`), each by these
  rules, and written back into its fresh counterpart, which must exist and have the same class:
  create such objects in `__init__` (or in the deployment) rather than later. An instance
  whose class defines `state()` and `load_state(data)` is saved as `state()` (plain data) and
  restored by calling `load_state` on its fresh counterpart; use that for what the rule cannot
  reach (torch modules, locks, files).

Anything else is refused when saving, naming its place (`node 3.buffer[2].lock: ...`). Objects
reached twice (shared between nodes, aliased arrays, cycles) are saved once and come back
shared. Restored arrays are writable copies; views come back as copies of what they showed.

A snapshot is produced and read by one `Dumper` / `Loader` pair over several roots (each with
its fresh counterpart); the loader must visit the same roots in the same order. Tags of the
tree (`["l", ...]` a list, `["o", name, value, ...]` an instance's fields, `["@", n]` the n-th
object saved before, `["="]` the fresh counterpart, ...) are private to this module.
"""

from __future__ import annotations

import functools
import types
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np

from kernel.messages import Message

__all__ = ["NONE", "Dumper", "Loader", "StateError"]


class StateError(ValueError):
    """An object cannot be saved as plain data, or a snapshot does not fit the fresh objects
    it is restored into; says which and why."""


NONE: Any = object()  # "no fresh counterpart"
_SCALARS = (type(None), bool, int, float, str, bytes)
_INT64 = (-(1 << 63), (1 << 64) - 1)
_MAX_INT_DIGITS = 160  # big ints (a PCG64 state is 128-bit) travel as decimal strings
_ARRAY_KINDS = "biufc"
_BIT_GENERATORS: dict[str, Any] = {
    n: getattr(np.random, n) for n in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")}
_CALLABLES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
              functools.partial, staticmethod, classmethod)
_CODE = (*_CALLABLES, types.ModuleType, types.CodeType, types.FrameType, types.GeneratorType)
# Subclasses of these hold content that attributes do not show: refused unless state().
_BUILTIN_BASES = (dict, list, tuple, set, frozenset, deque, np.ndarray, bytes, bytearray, str,
                  int, float, complex)
# Tags of objects that get a number (for "@" references), in the order they are met.
_NUMBERED = frozenset({"a", "l", "s", "q", "d", "od", "dd", "o", "S", "g", "bg"})


def fields(obj: Any) -> dict[str, Any]:
    """An instance's attributes: its `__dict__`, then the `__slots__` that are set."""
    out: dict[str, Any] = {}
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict):
        out.update(d)
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for s in (slots,) if isinstance(slots, str) else slots:
            if s in ("__dict__", "__weakref__") or s in out:
                continue
            name = f"_{cls.__name__.lstrip('_')}{s}" if s.startswith("__") else s
            try:
                out[name] = object.__getattribute__(obj, name)
            except AttributeError:
                continue
    return out


def _has_fields(obj: Any) -> bool:
    return isinstance(getattr(obj, "__dict__", None), dict) or any(
        c.__dict__.get("__slots__") for c in type(obj).__mro__)


def _custom_state(obj: Any) -> bool:
    t = type(obj)
    return callable(getattr(t, "state", None)) and callable(getattr(t, "load_state", None))


def _same_config(a: Any, b: Any, depth: int = 8) -> bool:
    """Whether `a` (live) and `b` (fresh) are the same configuration: the same object, equal
    plain values, or functions, partials and instances made of such."""
    if a is b:
        return True
    if type(a) is not type(b) or depth <= 0:
        return False
    if isinstance(a, (*_SCALARS, np.generic)):
        return bool(a == b) or (a != a and b != b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_config(x, y, depth - 1) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_config(a[k], b[k], depth - 1) for k in a)
    if isinstance(a, set | frozenset):
        return bool(a == b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, types.FunctionType):
        cells = [x.cell_contents for x in a.__closure__ or () if _cell_set(x)]
        other = [y.cell_contents for y in b.__closure__ or () if _cell_set(y)]
        return (a.__code__ is b.__code__ and _same_config(a.__defaults__, b.__defaults__, depth)
                and _same_config(a.__kwdefaults__, b.__kwdefaults__, depth)
                and _same_config(cells, other, depth - 1))
    if isinstance(a, types.MethodType):
        return a.__func__ is b.__func__ and (
            a.__self__ is b.__self__ or type(a.__self__) is type(b.__self__))
    if isinstance(a, functools.partial):
        return _same_config((a.func, a.args, a.keywords), (b.func, b.args, b.keywords), depth)
    if isinstance(a, Enum):
        return False  # enum members are singletons: `a is b` said it all
    fa, fb = fields(a), fields(b)
    return bool(fa) and list(fa) == list(fb) and all(
        _same_config(fa[k], fb[k], depth - 1) for k in fa)


def _cell_set(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _at(f: Any, key: Any, index: bool = False) -> Any:
    """The fresh counterpart of an item: `f[key]` when `f` holds it, else NONE."""
    try:
        if index:
            return f[key] if isinstance(f, list | tuple | deque) and key < len(f) else NONE
        return f[key] if isinstance(f, dict) and key in f else NONE
    except TypeError:  # an unhashable key
        return NONE


class Dumper:
    """Turns live objects into a plain-data tree, one root at a time (`dump`)."""

    def __init__(self) -> None:
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # every numbered object, so no id is reused meanwhile
        self.shared: set[int] | None = None  # when a set: collects what is its fresh counterpart

    def dump(self, obj: Any, fresh: Any = NONE, where: str = "state") -> Any:
        """`obj` as plain data; `fresh` is its fresh counterpart (NONE when there is none)."""
        try:
            return self._val(obj, fresh, where, 0)
        except RecursionError:
            raise StateError(f"cannot save {where}: it nests too deeply") from None

    def _number(self, obj: Any) -> None:
        self.memo[id(obj)] = len(self.keep)
        self.keep.append(obj)

    def _val(self, v: Any, f: Any, where: str, depth: int) -> Any:
        t = type(v)
        if t in _SCALARS and (t is not int or _INT64[0] <= v <= _INT64[1]):
            return v
        if t is int:
            if len(str(abs(v))) > _MAX_INT_DIGITS:
                raise StateError(f"cannot save {where}: an integer of more than "
                                 f"{_MAX_INT_DIGITS} digits")
            return ["I", str(v)]
        if isinstance(v, np.generic):
            if v.dtype.kind not in _ARRAY_KINDS:
                raise StateError(f"cannot save {where}: a numpy {v.dtype} scalar")
            return v
        n = self.memo.get(id(v))
        if n is not None:
            return ["@", n]
        if v is f and not isinstance(v, tuple | frozenset):
            if self.shared is not None:
                self.shared.add(id(v))
            return ["="]
        if depth > 200:
            raise StateError(f"cannot save {where}: it nests more than 200 levels deep")
        d = depth + 1
        val = self._val
        if t is Message:
            return ["M", *[val(x, NONE, f"{where}.{name}", d)
                           for name, x in zip(Message._fields, v)]]
        if t is tuple or t is frozenset:
            tag = "t" if t is tuple else "fs"
            return [tag, *[val(x, _at(f, i, True) if t is tuple else NONE, f"{where}[{i}]", d)
                           for i, x in enumerate(v)]]
        if isinstance(v, tuple) and hasattr(t, "_fields"):  # a named tuple
            if type(f) is not t:
                raise self._no_counterpart(v, where)
            return ["nt", *[val(x, f[i], f"{where}.{n}", d) for i, (n, x) in
                            enumerate(zip(t._fields, v))]]
        if isinstance(v, Enum):
            if type(f) is not t:
                raise self._no_counterpart(v, where)
            return ["e", v.name]
        if isinstance(v, _CODE) or t.__module__.partition(".")[0] == "torch":
            if f is not NONE and _same_config(v, f):
                return ["="]
            raise StateError(f"cannot save {where}: {_what(v)} is code or a torch object, not "
                             f"plain data, and differs "
                             f"from what a freshly built node holds there"
                             + ("" if f is not NONE else " (nothing)"))
        self._number(v)
        if t is np.ndarray:
            if v.dtype.kind not in _ARRAY_KINDS or v.dtype.fields is not None:
                raise StateError(f"cannot save {where}: an array of dtype {v.dtype}")
            return ["a", np.ascontiguousarray(v)]
        if t is list:
            return ["l", *[val(x, _at(f, i, True), f"{where}[{i}]", d) for i, x in enumerate(v)]]
        if t is deque:
            return ["q", v.maxlen, *[val(x, NONE, f"{where}[{i}]", d) for i, x in enumerate(v)]]
        if t is set:
            return ["s", *[val(x, NONE, f"{where}[*]", d) for x in v]]
        if t is dict or t is OrderedDict or t is defaultdict:
            if t is defaultdict and (type(f) is not t or not _same_config(
                    v.default_factory, f.default_factory)):
                raise self._no_counterpart(v, where)
            out: list[Any] = ["d" if t is dict else "od" if t is OrderedDict else "dd"]
            for k, x in v.items():
                out.append(val(k, NONE, f"{where} key {k!r}", d))
                out.append(val(x, _at(f, k), f"{where}[{k!r}]", d))
            return out
        if t is np.random.Generator:
            bg = v.bit_generator
            return ["g", type(bg).__name__, val(bg.state, NONE, where, d)]
        if type(v).__name__ in _BIT_GENERATORS and isinstance(v, np.random.BitGenerator):
            return ["bg", type(v).__name__, val(v.state, NONE, where, d)]
        if isinstance(v, _BUILTIN_BASES) and not _custom_state(v):
            base = next(b for b in _BUILTIN_BASES if isinstance(v, b)).__name__
            raise StateError(f"cannot save {where}: {_what(v)} is a subclass of {base}, whose "
                             f"content its attributes do not hold (use a plain {base}, or give "
                             f"the class state() and load_state())")
        if type(f) is not t:
            raise self._no_counterpart(v, where)
        if _custom_state(v):
            return ["S", val(v.state(), NONE, f"{where}.state()", d)]
        if not _has_fields(v):
            raise StateError(f"cannot save {where}: {_what(v)} is not plain data and has no "
                             f"attributes to save (give its class state() and load_state())")
        ff = fields(f)
        out = ["o"]
        for name, x in fields(v).items():
            out.append(name)
            out.append(val(x, ff.get(name, NONE), f"{where}.{name}", d))
        return out

    @staticmethod
    def _no_counterpart(v: Any, where: str) -> StateError:
        return StateError(f"cannot save {where}: {_what(v)} is not plain data, and a freshly "
                          f"built node holds no {type(v).__qualname__} there to restore it "
                          f"into (create it in __init__, or give its class state() and "
                          f"load_state())")


def _what(v: Any) -> str:
    t = type(v)
    return f"an instance of {t.__module__}.{t.__qualname__}"


class Loader:
    """Reads what `Dumper` wrote back, root by root (`load`), into fresh counterparts.

    Objects whose ids are in `frozen` (those every fresh build shares, such as a learner cached
    for the process: see `shared`) are never written into; a snapshot may refer to them only
    as "the fresh one", so a crafted file cannot change what later builds in the process get."""

    def __init__(self, frozen: set[int] | frozenset[int] = frozenset()) -> None:
        self.objs: list[Any] = []
        self.frozen = frozen

    def load(self, x: Any, fresh: Any = NONE) -> Any:
        """The value `x` (one root of a snapshot) stands for, written into `fresh` where it
        is an object (`fresh` is then returned, restored)."""
        try:
            return self._val(x, fresh, 0)
        except RecursionError:
            raise StateError("the state nests too deeply") from None

    def _bad(self, why: str) -> StateError:
        return StateError(f"state object {len(self.objs)}: {why}")

    def _val(self, x: Any, f: Any, depth: int) -> Any:
        t = type(x)
        if t in _SCALARS:
            return x
        if isinstance(x, np.generic):
            if x.dtype.kind in _ARRAY_KINDS:
                return x
            raise self._bad(f"a numpy {x.dtype} scalar")
        if t is not list or not x or type(x[0]) is not str:
            raise self._bad(f"expected a scalar or a [tag, ...] list, got {type(x).__name__}")
        if depth > 200:
            raise self._bad("nests more than 200 levels deep")
        tag, d = x[0], depth + 1
        items = x[1:]
        if tag == "@":
            if len(items) != 1 or type(items[0]) is not int or not 0 <= items[0] < len(self.objs):
                raise self._bad(f"reference {items!r} to no earlier object")
            return self.objs[items[0]]
        if tag == "=":
            if f is NONE:
                raise self._bad("refers to configuration a freshly built node does not have "
                                "(a different config or protocol version?)")
            return f
        if tag == "I":
            s = items[0] if len(items) == 1 else None
            if type(s) is not str or len(s) > _MAX_INT_DIGITS + 1 or not s.lstrip("-").isdigit():
                raise self._bad("a big integer must be a short decimal string")
            return int(s)
        if tag in ("t", "fs"):
            vals = [self._val(v, _at(f, i, True) if tag == "t" else NONE, d)
                    for i, v in enumerate(items)]
            return tuple(vals) if tag == "t" else frozenset(self._hashable(vals))
        if tag == "M":
            if len(items) != 6:
                raise self._bad("a message has 6 fields")
            src, dst, kind, body, sent_at, seq = (self._val(v, NONE, d) for v in items)
            if (type(src) is not int or type(dst) is not int or type(kind) is not str
                    or type(body) is not dict or type(sent_at) is not float
                    or type(seq) is not int):
                raise self._bad("message fields have the wrong types")
            return tuple.__new__(Message, (src, dst, kind, body, sent_at, seq))
        if tag == "nt":
            if not (isinstance(f, tuple) and hasattr(type(f), "_fields")
                    and len(items) == len(f)):
                raise self._bad("a named tuple where a fresh node holds none of that size")
            make: Any = type(f)._make  # type: ignore[attr-defined]
            return make(self._val(v, f[i], d) for i, v in enumerate(items))
        if tag == "e":
            if not isinstance(f, Enum) or len(items) != 1 or type(items[0]) is not str:
                raise self._bad("an enum member where a fresh node holds no enum")
            try:
                return type(f)[items[0]]
            except KeyError:
                raise self._bad(f"{type(f).__name__} has no member {items[0]!r}") from None
        if tag not in _NUMBERED:
            raise self._bad(f"unknown tag {tag!r}")
        return self._numbered(tag, items, f, d)

    def _hashable(self, vals: list[Any]) -> list[Any]:
        for v in vals:
            try:
                hash(v)
            except TypeError:
                raise self._bad(f"a set member or dict key of type {type(v).__name__} is not "
                                f"hashable") from None
        return vals

    def _numbered(self, tag: str, items: list[Any], f: Any, d: int) -> Any:
        out: Any
        old: Any
        bg: Any
        if f is not NONE and id(f) in self.frozen:
            if tag in ("o", "S", "dd"):
                raise self._bad(f"would write into a {type(f).__name__} that every fresh build "
                                f"shares (configuration); a snapshot may only refer to it")
            f = NONE  # a container or generator: restored as a new one, the shared one untouched
        n = len(self.objs)
        self.objs.append(None)
        if tag == "a":
            if len(items) != 1 or type(items[0]) is not np.ndarray:
                raise self._bad("an array entry holds one array")
            a = items[0]
            if a.dtype.kind not in _ARRAY_KINDS:
                raise self._bad(f"an array of dtype {a.dtype}")
            self.objs[n] = arr = np.array(a, copy=True)
            return arr
        if tag in ("l", "q"):
            maxlen = None
            if tag == "q":
                maxlen = items[0] if items else None
                if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
                    raise self._bad(f"deque maxlen {maxlen!r}")
                items = items[1:]
            same = type(f) is (list if tag == "l" else deque) and (
                tag == "l" or getattr(f, "maxlen", None) == maxlen)
            old = list(f) if same else []
            seq: Any = f if same else ([] if tag == "l" else deque(maxlen=maxlen))
            seq.clear()
            self.objs[n] = seq
            seq.extend(self._val(v, old[i] if i < len(old) else NONE, d)
                       for i, v in enumerate(items))
            return seq
        if tag == "s":
            out = f if type(f) is set else set()
            out.clear()
            self.objs[n] = out
            out.update(self._hashable([self._val(v, NONE, d) for v in items]))
            return out
        if tag in ("d", "od", "dd"):
            kind = {"d": dict, "od": OrderedDict, "dd": defaultdict}[tag]
            if len(items) % 2:
                raise self._bad("dict keys and values must come in pairs")
            if tag == "dd" and type(f) is not defaultdict:
                raise self._bad("a defaultdict where a fresh node holds none")
            old = dict(f) if type(f) is kind else {}
            out = f if type(f) is kind else kind()
            out.clear()
            self.objs[n] = out
            for i in range(0, len(items), 2):
                (k,) = self._hashable([self._val(items[i], NONE, d)])
                out[k] = self._val(items[i + 1], old.get(k, NONE), d)
            return out
        if tag in ("g", "bg"):
            if len(items) != 2 or items[0] not in _BIT_GENERATORS:
                raise self._bad(f"bit generator {items[0] if items else None!r} is not one "
                                f"of {', '.join(_BIT_GENERATORS)}")
            cls = _BIT_GENERATORS[items[0]]
            if tag == "g":
                fresh_bg = f.bit_generator if type(f) is np.random.Generator else None
                bg = fresh_bg if type(fresh_bg) is cls else cls(0)
                out = f if fresh_bg is bg else np.random.Generator(bg)
            else:
                bg = out = f if type(f) is cls else cls(0)
            self.objs[n] = out
            state = self._val(items[1], NONE, d)
            try:
                bg.state = state
            except Exception as exc:
                raise self._bad(f"bad {items[0]} state: {type(exc).__name__}: {exc}") from None
            return out
        if f is NONE or isinstance(f, (*_SCALARS, *_CODE)) or not _has_fields(f):
            raise self._bad("an object where a freshly built node holds none (a different "
                            "config or protocol version?)")
        self.objs[n] = f
        if tag == "S":
            if len(items) != 1 or not _custom_state(f):
                raise self._bad(f"state() data for a {type(f).__name__}, which has no "
                                f"load_state")
            f.load_state(self._val(items[0], NONE, d))
            return f
        if len(items) % 2:
            raise self._bad("object fields must come in name, value pairs")
        old = fields(f)
        names = set()
        for i in range(0, len(items), 2):
            name = items[i]
            if (type(name) is not str or not name.isidentifier()
                    or (name.startswith("__") and name.endswith("__"))):
                raise self._bad(f"field name {name!r} is not an attribute name a state may set")
            names.add(name)
            value = self._val(items[i + 1], old.get(name, NONE), d)
            try:
                object.__setattr__(f, name, value)
            except (AttributeError, TypeError) as exc:
                raise self._bad(f"cannot set {type(f).__name__}.{name}: {exc}") from None
        extra = getattr(f, "__dict__", None)
        if isinstance(extra, dict):
            for name in [k for k in extra if k not in names]:
                del extra[name]  # restored in place: attributes the saved object lacked go
        return f


def shared(node: Any, probe: Any) -> set[int]:
    """The ids of the objects `node` holds that `probe` (built from the same config) holds at
    the same place: what every build shares, which saving marks as "the fresh one"."""
    d = Dumper()
    d.shared = set()
    d.dump(node, probe)
    return d.shared


def snapshot_roundtrip(value: Any, fresh: Any = NONE,
                       through: Callable[[Any], Any] = lambda tree: tree) -> Any:
    """Dump `value` against `fresh`, pass the tree through `through` (an encode and decode),
    and load it into `fresh` again: a one-root checkpoint, for tests and protocol authors."""
    return Loader().load(through(Dumper().dump(value, fresh)), fresh)
