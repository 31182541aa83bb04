"""The object-state walker: graphs of plain values and protocol-like objects survive a trip
through the codec exactly (types, sharing, cycles, order, generator streams), configuration is
found again in fresh objects instead of being saved, and anything it cannot or must not
handle is refused with an error that names it."""

from __future__ import annotations

import fractions
import functools
import threading
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.messages import Message
from kernel.run.state import Fresh, StateError, dump, load
from kernel.wire.codec import Codec

CODEC = Codec(max_depth=64)
ALLOWED = ("kernel.", "tests.")


def trip(root: Any, fresh: Fresh | None = None, anchors: dict[int, int] | None = None,
         load_fresh: Fresh | None = None) -> Any:
    """Dump, encode, decode, load: what a checkpoint does to `root`."""
    table = dump(root, fresh=fresh, anchors=anchors, allowed=ALLOWED)
    data = bytes(b"".join(CODEC.encode_body({"t": table})))
    return load(CODEC.decode_body(data)["t"], fresh=load_fresh or fresh, allowed=ALLOWED)


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


scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
           | st.floats(allow_nan=True) | st.text(max_size=5) | st.binary(max_size=5))
# NaN keys are left out: they are unequal to themselves, so no dict comparison could tell.
keys = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
        | st.floats(allow_nan=False) | st.text(max_size=5) | st.binary(max_size=5))
hashables = st.recursive(keys, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3),
                         max_leaves=6)
values: st.SearchStrategy[Any] = st.recursive(
    scalars | st.builds(lambda n, d: (np.arange(n) % 3).astype(d), st.integers(0, 5),
                        st.sampled_from(["<f4", "<i8", "|u1", "<c16", "|b1"])),
    lambda c: (st.lists(c, max_size=4) | st.tuples(c, c)
               | st.dictionaries(hashables, c, max_size=4)
               | st.sets(hashables, max_size=3)
               | st.builds(deque, st.lists(c, max_size=3))),
    max_leaves=12,
)


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


def scaled(a: float, b: float, *, c: float = 1.0) -> float:
    return a * b * c


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


class Node:
    """Protocol-like: mutable state, a shared config object, a learner-like heavy object."""

    def __init__(self, opts: Opts, heavy: Any, scale: float) -> None:
        self.opts, self.heavy = opts, heavy
        self.f = lambda t: t * scale  # a closure: never importable
        self.step = self.advance  # a bound method of itself
        self.n = 0
        self.seen: set[int] = set()
        self.buf: deque[int] = deque(maxlen=3)

    def advance(self) -> int:
        self.n += 1
        return self.n


def test_instances_generators_methods_and_partials_come_back() -> None:
    gen = np.random.default_rng([3, 4])
    gen.random(5)
    od = OrderedDict([(3, "c"), (1, "a")])
    dd: defaultdict[str, list[int]] = defaultdict(list, {"z": [1]})
    root = {
        "opts": Opts(3, "x"), "slots": Slotted(5), "gen": gen, "od": od, "dd": dd,
        "part": functools.partial(scaled, 7, c=2.0), "msg": Message(1, 2, "k", {"x": 1.5}, 0.25, 9),
        "big": 1 << 100, "c": 1 + 2j, "r": range(2, 9, 3), "dt": np.dtype("<f4"),
        "ns": np.float32(1.5), "ba": bytearray(b"ab"), "cls": Slotted,
        "keys": {(1, "a"): 1, 2: "b", frozenset({1}): 3},
    }
    back = trip(root)
    assert back["opts"] == Opts(3, "x") and type(back["opts"]) is Opts
    assert back["slots"].x == 5 and back["slots"].hidden() == 10
    assert not hasattr(back["slots"], "unset")
    # The generator continues exactly where the original would.
    assert back["gen"].random(3).tolist() == gen.random(3).tolist()
    assert list(back["od"].items()) == [(3, "c"), (1, "a")] and type(back["od"]) is OrderedDict
    assert back["dd"]["new"] == [] and back["dd"]["z"] == [1]
    assert back["part"](3) == 42.0
    assert type(back["msg"]) is Message and back["msg"] == root["msg"]
    assert (back["big"], back["c"], back["r"], back["dt"]) == (1 << 100, 1 + 2j, range(2, 9, 3),
                                                               np.dtype("<f4"))
    assert type(back["ns"]) is np.float32 and back["ns"] == 1.5
    assert back["ba"] == bytearray(b"ab") and back["cls"] is Slotted
    assert list(back["keys"]) == [(1, "a"), 2, frozenset({1})]


def make_node(heavy: Any, opts: Opts) -> Any:
    return lambda i: Node(opts, heavy, scale=2.0)


def test_configuration_is_found_again_in_fresh_nodes_not_saved() -> None:
    heavy, opts = threading.Lock(), Opts(1, "cfg")  # a lock cannot be saved by value
    live = make_node(heavy, opts)(0)
    live.advance()
    live.seen.add(4)
    live.buf.extend([1, 2, 3, 4])
    fresh = Fresh(make_node(heavy, opts), [0])
    # The loading side has its own configuration objects (another process would).
    heavy2, opts2 = threading.Lock(), Opts(1, "cfg")
    back = trip({"node": live}, fresh, {id(live): 0}, Fresh(make_node(heavy2, opts2), [0]))
    node = back["node"]
    assert node is not live and node.heavy is heavy2 and node.opts is opts2
    assert node.f(3) == 6.0  # the closure, taken from the fresh node
    assert node.step() == 2 and node.n == 2  # the bound method is bound to the restored node
    assert node.seen == {4} and list(node.buf) == [2, 3, 4] and node.buf.maxlen == 3


class Shared:
    """State that `build` creates once and hands to every node (like error-feedback residuals
    kept for all clients)."""

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}


class Member:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared


def build_members() -> Any:
    shared = Shared()
    return lambda i: Member(shared)


def test_state_a_build_shares_between_nodes_is_saved_and_restored_into_the_new_build() -> None:
    live_make = build_members()
    live = [live_make(i) for i in range(3)]
    live[0].shared.calls[2] = 5
    anchors = {id(n): i for i, n in enumerate(live)}
    # Counterparts from another build: its Shared is another object, so this one is state.
    table = dump({"nodes": live}, fresh=Fresh(build_members(), range(3)), anchors=anchors,
                 allowed=ALLOWED)
    data = bytes(b"".join(CODEC.encode_body({"t": table})))
    new_make = build_members()
    back = load(CODEC.decode_body(data)["t"], fresh=Fresh(new_make, range(3)), allowed=ALLOWED)
    nodes = back["nodes"]
    assert nodes[0].shared.calls == {2: 5}
    assert all(n.shared is nodes[0].shared for n in nodes)
    # Restored into the new build's own object: a node it makes later (a restart) shares it.
    assert new_make(7).shared is nodes[0].shared


def test_a_closure_that_differs_from_the_fresh_one_is_refused() -> None:
    heavy, opts = object(), Opts(1, "cfg")
    live = make_node(heavy, opts)(0)
    live.f = lambda t: t + 1  # not what make_node makes
    fresh = Fresh(make_node(heavy, opts), [0])
    with pytest.raises(StateError, match=r"cannot save node 0\.f: a closure or lambda"):
        dump({"node": live}, fresh=fresh, anchors={id(live): 0}, allowed=ALLOWED)


@pytest.mark.parametrize("bad, what", [
    (fractions.Fraction(1, 3), r"\['x'\]: an instance of fractions:Fraction, outside the "
                               r"allowed modules"),
    (threading.Lock(), r"\['x'\]: an instance of _thread:lock"),
    (lambda: 1, r"\['x'\]: a closure or lambda"),
    (np.array(["a"]), r"\['x'\]: an array of dtype <U1"),
])
def test_what_cannot_be_saved_is_refused_naming_where_it_is(bad: Any, what: str) -> None:
    with pytest.raises(StateError, match=r"cannot save state" + what):
        dump({"x": bad}, allowed=ALLOWED)


def tampered(entry: list[Any]) -> dict[str, Any]:
    return {"objs": [["l", [1]], entry], "root": [0]}


@pytest.mark.parametrize("entry, what", [
    (["fn", "os:system"], r"refuses to import os:system: module 'os' is not under the "
                          r"allowed ones"),
    (["o", "subprocess:Popen", None], r"refuses to import subprocess:Popen"),
    (["fn", "builtins:eval"], r"refuses builtins:eval: only builtin and numpy scalar types"),
    (["g", "Evil", [0]], r"bit generator 'Evil' is not one of"),
    (["f", "x:y", 0], r"refers to a fresh deployment, and none was given"),
    (["i", "9" * 5000], r"a big int must be a decimal string"),
    (["zz"], r"unknown tag 'zz'"),
    (["l", [7]], r"reference to entry 7; the table has 2"),
    (["t", [1]], r"refers to itself through immutable objects only"),
])
def test_tampered_tables_are_refused_without_importing_or_running_anything(
        entry: list[Any], what: str) -> None:
    with pytest.raises(StateError, match=what):
        load(tampered(entry), allowed=ALLOWED)
