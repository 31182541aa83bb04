"""Graph generators and mixing weights: shapes, degrees, connectivity, stochasticity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.options import ConfigError
from protocols import topology

UNDIRECTED = ("complete", "ring", "ring_lattice", "torus", "random_regular", "erdos_renyi")


@st.composite
def graphs(draw: st.DrawFn, kinds: tuple[str, ...] = UNDIRECTED) -> topology.Graph:
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(3, 40))
    seed = draw(st.integers(0, 2**31))
    section: dict[str, object] = {"kind": kind, "seed": seed}
    if kind == "ring_lattice":
        section["degree"] = draw(st.integers(1, (n - 1) // 2)) * 2
    elif kind == "random_regular":
        degree = draw(st.integers(0, min(n - 1, 8)))
        if n * degree % 2:
            degree -= 1
        section["degree"] = degree
    elif kind == "erdos_renyi":
        section["p"] = draw(st.floats(0.3, 1.0))
        section["connected"] = draw(st.booleans())
    elif kind == "random_out":
        section["degree"] = draw(st.integers(1, min(n - 1, 4)))
    g, _ = topology.from_config(section, n, seed=draw(st.integers(0, 100)))
    return g


def check_shape(g: topology.Graph) -> None:
    for i, outs in enumerate(g.out):
        assert list(outs) == sorted(set(outs)), f"node {i}: {outs} not sorted and distinct"
        assert i not in outs, f"node {i} neighbours itself"
        assert all(0 <= j < g.n for j in outs)
        assert all(isinstance(j, int) for j in outs)
        if not g.directed:
            assert all(i in g.out[j] for j in outs), f"node {i}: edge not symmetric"


@given(graphs(UNDIRECTED + ("random_out",)))
def test_neighbour_lists_are_sorted_simple_and_symmetric_when_undirected(g: topology.Graph) -> None:
    check_shape(g)


@given(graphs())
def test_metropolis_weights_are_symmetric_and_doubly_stochastic(g: topology.Graph) -> None:
    w = topology.mixing_matrix(g, "metropolis")
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= -1e-15).all()
    adjacency = np.zeros_like(w, dtype=bool)
    for i, j in g.edges():
        adjacency[i, j] = True
    np.fill_diagonal(adjacency, True)
    assert not w[~adjacency].any(), "weight on a non-edge"


@given(graphs())
def test_max_degree_weights_are_doubly_stochastic_and_uniform_rows_sum_to_one(
        g: topology.Graph) -> None:
    w = topology.mixing_matrix(g, "max_degree")
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w, w.T, atol=0)
    u = topology.mixing_matrix(g, "uniform")
    np.testing.assert_allclose(u.sum(axis=1), 1.0, atol=1e-12)
    if len(set(g.degrees())) == 1:  # regular: uniform is doubly stochastic too
        np.testing.assert_allclose(u.sum(axis=0), 1.0, atol=1e-12)


@given(st.integers(3, 50), st.data())
def test_ring_lattice_neighbours_are_the_nearest_on_each_side(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, (n - 1) // 2)) * 2
    g = topology.ring_lattice(n, k)
    for i in range(n):
        want = sorted({(i + d) % n for d in range(-k // 2, k // 2 + 1)} - {i})
        assert list(g.out[i]) == want


@given(st.integers(2, 60), st.integers(0, 8), st.integers(0, 10**6))
def test_random_regular_is_regular_simple_and_seeded(n: int, k: int, seed: int) -> None:
    k = min(k, n - 1)
    if n * k % 2:
        k -= 1
    g = topology.random_regular(n, k, seed)
    assert g.degrees() == [k] * n
    check_shape(g)
    assert topology.random_regular(n, k, seed) == g


@given(st.integers(2, 30), st.floats(0.05, 1.0), st.integers(0, 10**6), st.booleans())
def test_connected_random_graphs_are_connected(n: int, p: float, seed: int, directed: bool) -> None:
    try:
        g = topology.erdos_renyi(n, p, seed, directed=directed, connected=True)
    except ConfigError:
        return  # p too small to find a connected draw: the error says so
    assert g.is_connected()
    assert g == topology.erdos_renyi(n, p, seed, directed=directed, connected=True)


@given(st.integers(2, 30), st.integers(1, 3), st.integers(0, 10**6))
def test_random_out_is_strongly_connected_with_fixed_out_degree(n: int, k: int, seed: int) -> None:
    k = min(k, n - 1)
    g = topology.random_out(n, k, seed)
    assert g.directed and g.is_connected()
    assert g.degrees() == [k] * n


def test_is_connected_sees_a_directed_graph_that_is_only_weakly_connected() -> None:
    assert not topology.from_edges(3, [[0, 1], [1, 2]], directed=True).is_connected()
    assert topology.from_edges(3, [[0, 1], [1, 2], [2, 0]], directed=True).is_connected()
    assert not topology.from_edges(4, [[0, 1], [2, 3]]).is_connected()


def test_torus_is_a_wrapped_grid() -> None:
    g = topology.torus(12)  # 3 x 4
    assert g.out[0] == (1, 3, 4, 8)
    assert g.degrees() == [4] * 12
    assert topology.torus(8, rows=2).degrees() == [3] * 8  # up and down are the same node


def test_directed_ring_and_edge_list_from_config() -> None:
    g, rule = topology.from_config({"kind": "ring", "directed": True}, 4)
    assert g.out == ((1,), (2,), (3,), (0,)) and g.directed and rule == "uniform"
    g, rule = topology.from_config(
        {"kind": "edges", "edges": [[0, 2], [2, 1]], "weights": "metropolis"}, 3)
    assert g.out == ((2,), (2,), (0, 1)) and not g.directed and rule == "metropolis"
    assert g.in_neighbours() == g.out


@pytest.mark.parametrize(("section", "n", "fragment"), [
    ({"kind": "ring_lattice", "degree": 3}, 10, "degree = 3"),
    ({"kind": "ring_lattice", "degree": 10}, 10, "degree = 10"),
    ({"kind": "random_regular", "degree": 3}, 5, "n*degree even"),
    ({"kind": "torus", "rows": 3}, 10, "rows = 3"),
    ({"kind": "edges", "edges": [[0, 5]]}, 3, "edges[0]"),
    ({"kind": "edges", "edges": [[0, "a"]]}, 3, "edges[0]"),
    ({"kind": "hypercube"}, 8, "kind"),
    ({"kind": "ring", "degre": 2}, 8, "did you mean 'degree'"),
    ({"kind": "erdos_renyi", "p": 1.5}, 8, "p = 1.5"),
    ({"kind": "torus", "directed": True}, 9, "directed"),
    ({"weights": "laplacian"}, 8, "weights"),
])
def test_bad_topology_config_names_the_key(section: dict[str, object], n: int,
                                           fragment: str) -> None:
    with pytest.raises(ConfigError, match="protocol.topology") as info:
        topology.from_config(section, n)
    assert fragment in str(info.value)


def test_mixing_weights_refuse_a_directed_graph() -> None:
    with pytest.raises(ValueError, match="undirected"):
        topology.mixing_weights(topology.ring(4, directed=True))
