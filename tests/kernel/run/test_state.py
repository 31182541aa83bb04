"""Protocol state as plain data: graphs of plain values survive a trip through the codec exactly
(types, sharing, cycles, order, generator streams); instances are written back into their
fresh counterparts; configuration is taken from the fresh objects, never saved; and whatever is
not plain data, or a tree that does not fit, is refused with an error that names it, while
loading any tree imports and runs nothing."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.messages import Message
from kernel.run.state import NONE, Dumper, Loader, StateError
from kernel.wire.codec import Codec

CODEC = Codec(max_depth=256)


def through_codec(tree: Any) -> Any:
    return CODEC.decode_body(bytes(b"".join(CODEC.encode_body({"t": tree}))))["t"]


def trip(live: Any, fresh_dump: Any = NONE, fresh_load: Any = NONE) -> Any:
    """Dump against one fresh counterpart, encode, decode, load into another: a checkpoint."""
    tree = Dumper().dump(live, fresh_dump)
    return Loader().load(through_codec(tree), fresh_load)


def same(a: Any, b: Any) -> bool:
    """Equal values of exactly the same types, all the way down (dict order included)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple | deque):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


scalars = (st.none() | st.booleans() | st.integers(-(1 << 130), 1 << 130)
           | st.floats(allow_nan=True) | st.text(max_size=5) | st.binary(max_size=5))
keys = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
        | st.floats(allow_nan=False) | st.text(max_size=5))
hashables = st.recursive(keys, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3),
                         max_leaves=6)
values: st.SearchStrategy[Any] = st.recursive(
    scalars | st.builds(lambda n, d: (np.arange(n) % 3).astype(d), st.integers(0, 5),
                        st.sampled_from(["<f4", "<i8", "|u1", "<c16", "|b1"]))
    | st.sampled_from([np.float32(1.5), np.int8(-3), np.float64(2.0)]),
    lambda c: (st.lists(c, max_size=4) | st.tuples(c, c)
               | st.dictionaries(hashables, c, max_size=4)
               | st.sets(hashables, max_size=3)
               | st.builds(deque, st.lists(c, max_size=3))),
    max_leaves=12,
)


@settings(max_examples=60)
@given(values)
def test_any_graph_of_plain_values_comes_back_equal_with_the_same_types(v: Any) -> None:
    assert same(trip(v), v)


def test_sharing_and_cycles_survive_and_arrays_come_back_writable() -> None:
    arr = np.arange(6, dtype=np.float32)
    arr.flags.writeable = False
    inner: list[Any] = [arr]
    root: dict[str, Any] = {"a": inner, "b": inner, "arr": arr, "again": (arr, arr)}
    inner.append(root)  # a cycle through a list and a dict
    back = trip(root)
    assert back["a"] is back["b"] and back["a"][1] is back
    assert back["arr"] is back["a"][0] is back["again"][0] is back["again"][1]
    assert back["arr"].flags.writeable and same(back["arr"], arr)


def test_generators_messages_and_ordered_dicts_come_back() -> None:
    gen = np.random.default_rng([3, 4])
    gen.random(5)
    root = {"gen": gen, "msg": Message(1, 2, "k", {"x": np.ones(2)}, 0.25, 9),
            "od": OrderedDict([(3, "c"), (1, "a")]), "bg": np.random.PCG64(7)}
    back = trip(root)
    assert back["gen"].random(3).tolist() == gen.random(3).tolist()
    assert type(back["msg"]) is Message and back["msg"].body["x"].tolist() == [1.0, 1.0]
    assert type(back["od"]) is OrderedDict and list(back["od"]) == [3, 1]
    assert back["bg"].random_raw() == root["bg"].random_raw()


@dataclass(frozen=True)
class Opts:
    k: int
    name: str


class Slotted:
    __slots__ = ("x", "__hidden", "unset")

    def __init__(self, x: Any) -> None:
        self.x = x
        self.__hidden = x * 2

    def hidden(self) -> Any:
        return self.__hidden


class Custom:
    """Not plain data (a lock), but offers its state as plain data."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def state(self) -> Any:
        return {"count": self.count}

    def load_state(self, data: Any) -> None:
        self.count = data["count"]


class Node:
    """Protocol-like: mutable state, configuration, a closure, a heavy shared object."""

    def __init__(self, opts: Opts, heavy: Any, scale: float, shared: dict[str, int]) -> None:
        self.opts, self.heavy, self.shared = opts, heavy, shared
        self.f = lambda t: t * scale  # a closure: code, the same in every fresh build
        self.step = self.advance  # a bound method of itself
        self.n = 0
        self.seen: set[int] = set()
        self.buf: deque[int] = deque(maxlen=3)
        self.slots = Slotted(1)
        self.custom = Custom()
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.later: Any = None

    def advance(self) -> int:
        self.n += 1
        return self.n


def build(heavy: Any) -> Any:
    """A deployment-like `make_node`: every node shares `heavy` and one `shared` dict."""
    opts, shared = Opts(1, "cfg"), {"calls": 0}
    return lambda i: Node(opts, heavy, 2.0, shared)


def test_instances_are_written_into_fresh_counterparts_and_configuration_is_kept() -> None:
    heavy = threading.Lock()  # a lock cannot be saved: the same object is configuration
    make = build(heavy)
    live = [make(0), make(1)]
    live[0].advance()
    live[0].seen.add(4)
    live[0].buf.extend([1, 2, 3, 4])
    live[0].slots.x = 9
    live[0].custom.count = 5
    live[0].counts["a"] += 2
    live[0].shared["calls"] = 3
    live[0].later = 1.5
    dumper = Dumper()
    fresh = build(heavy)
    trees = [dumper.dump(n, fresh(i), f"node {i}") for i, n in enumerate(live)]
    # Another process: its own configuration objects and deployment.
    heavy2 = threading.Lock()
    make2 = build(heavy2)
    loader = Loader()
    got = [loader.load(through_codec(t), make2(i)) for i, t in enumerate(trees)]
    node = got[0]
    assert node.heavy is heavy2 and type(node.opts) is Opts and node.opts == Opts(1, "cfg")
    assert node.f(3) == 6.0 and node.step() == 2 and node.n == 2
    assert node.seen == {4} and list(node.buf) == [2, 3, 4] and node.buf.maxlen == 3
    assert node.slots.hidden() == 2 and node.slots.x == 9 and not hasattr(node.slots, "unset")
    assert node.custom.count == 5 and type(node.custom.lock) is type(heavy2)
    assert node.counts["new"] == 0 and node.counts["a"] == 2
    assert node.later == 1.5
    # What build shares stays shared, with what its make_node makes later (a restart).
    assert got[1].shared is node.shared and make2(5).shared is node.shared
    assert node.shared == {"calls": 3}


# Audit hooks cannot be removed: one for the module, listening only while AUDIT is a list.
AUDIT: list[str] | None = None
DANGER = ("import", "exec", "compile", "os.system", "subprocess.Popen", "os.exec",
          "os.posix_spawn", "os.spawn", "open")


def _audit(event: str, args: Any) -> None:
    if AUDIT is not None and event in DANGER:
        AUDIT.append(f"{event} {args!r:.100}")


sys.addaudithook(_audit)


@pytest.mark.parametrize("bad, what", [
    (threading.Lock(), r"state\['x'\]: an instance of _thread.lock is not plain data, and a "
                       r"freshly built node holds no lock there"),
    (lambda: 1, r"state\['x'\]: an instance of builtins.function is code"),
    (np.array(["a"]), r"state\['x'\]: an array of dtype <U1"),
    (1 << 1000, r"state\['x'\]: an integer of more than"),
    (sys, r"state\['x'\]: an instance of builtins.module is code"),
])
def test_what_cannot_be_saved_is_refused_naming_where_it_is(bad: Any, what: str) -> None:
    with pytest.raises(StateError, match=r"cannot save " + what):
        Dumper().dump({"x": bad})


def test_an_object_created_after_init_without_a_counterpart_is_refused() -> None:
    live = build(None)(0)
    live.later = Slotted(3)  # the fresh node holds None there
    with pytest.raises(StateError, match=r"node 0\.later: .* holds no Slotted there .* \(create "
                                         r"it in __init__"):
        Dumper().dump(live, build(None)(0), "node 0")


def tree_parts(tree: Any) -> st.SearchStrategy[Any]:
    """Trees like a snapshot's, mutated: tags, references, names and values anywhere."""
    leaf = (st.sampled_from(["@", "=", "o", "S", "l", "d", "dd", "g", "bg", "M", "e", "nt", "I",
                             "a", "os", "system", "__class__", "__dict__", "PCG64", "f"])
            | st.integers(-3, 40) | st.none() | st.floats() | st.binary(max_size=4)
            | st.just(np.zeros(2)) | st.just(tree))
    return st.recursive(leaf, lambda c: st.lists(c, max_size=5), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_loading_any_tree_raises_only_state_errors_and_runs_nothing(
        data: st.DataObject) -> None:
    global AUDIT
    make = build(None)
    live = make(0)
    live.advance()
    tree = Dumper().dump({"node": live, "gen": np.random.default_rng(1)}, {"node": make(0)})
    mutated = data.draw(tree_parts(tree), label="tree")
    fresh = make(0)
    AUDIT = []
    try:
        Loader().load(mutated, {"node": fresh})
    except StateError:
        pass
    finally:
        seen, AUDIT = AUDIT, None
    assert seen == []


@pytest.mark.parametrize("name", ["__class__", "__dict__", "__init__", "not an identifier", 7])
def test_a_tree_cannot_set_dunder_or_odd_attributes(name: Any) -> None:
    fresh = build(None)(0)
    with pytest.raises(StateError, match="is not an attribute name a state may set"):
        Loader().load(["o", name, 1], fresh)
    assert type(fresh) is Node


class Bag(dict):  # type: ignore[type-arg]
    """A dict subclass: its items are not in its attributes."""


def test_subclasses_of_containers_are_refused_rather_than_saved_without_their_content() -> None:
    with pytest.raises(StateError, match=r"state\['x'\]: .*Bag is a subclass of dict"):
        Dumper().dump({"x": Bag(a=1)}, {"x": Bag()})
