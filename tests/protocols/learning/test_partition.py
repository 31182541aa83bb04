"""Partitioners: every sample in exactly one client, minimum sizes, label skew that fades as
alpha grows, seeded repeatability, and flwr-datasets' Dirichlet definition draw for draw."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError
from protocols.learning import partition as P


def _labels(seed: int, n: int, classes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _flwr_dirichlet(targets, num_partitions, alpha, min_partition_size, self_balancing, seed):
    """flwr-datasets 0.5 DirichletPartitioner._determine_partition_id_to_indices_if_needed,
    transcribed loop for loop (dataset.unique gives labels in order of first appearance)."""
    rng = np.random.default_rng(seed)
    alpha = np.full(num_partitions, float(alpha))
    seen, unique = set(), []
    for t in targets.tolist():
        if t not in seen:
            seen.add(t)
            unique.append(t)
    avg = len(targets) / num_partitions
    tries = 0
    while True:
        ids = {nid: [] for nid in range(num_partitions)}
        for k in unique:
            members = np.nonzero(targets == k)[0]
            props = rng.dirichlet(alpha)
            share = {nid: props[nid] for nid in range(num_partitions)}
            if self_balancing:
                for nid in share.copy():
                    if len(ids[nid]) > avg:
                        share[nid] = 0
                total = sum(share.values())
                for nid, p in share.copy().items():
                    share[nid] = p / total
            cuts = (np.cumsum(list(share.values())) * len(members)).astype(int)[:-1]
            for nid, part in enumerate(np.split(members, cuts)):
                ids[nid].extend(part.tolist())
        if min(len(v) for v in ids.values()) >= min_partition_size:
            break
        tries += 1
        if tries == 10:
            raise ValueError("The max number of attempts (10) was reached.")
    for v in ids.values():
        rng.shuffle(v)
    return [ids[i] for i in range(num_partitions)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(50, 400), clients=st.integers(1, 12),
       classes=st.integers(1, 7), alpha=st.sampled_from([0.1, 0.5, 1.0, 10.0]),
       balancing=st.booleans())
def test_dirichlet_is_flwr_datasets_definition(seed, n, clients, classes, alpha, balancing):
    y = _labels(seed, n, classes)
    min_size = min(2, n // clients)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ref = _flwr_dirichlet(y, clients, alpha, min_size, balancing, seed)
        except ValueError:
            with pytest.raises(ConfigError, match="no draw in 10 tries"):
                P.dirichlet(y, clients, np.random.default_rng(seed), alpha=alpha,
                            min_partition_size=min_size, self_balancing=balancing)
            return
    got = P.dirichlet(y, clients, np.random.default_rng(seed), alpha=alpha,
                      min_partition_size=min_size, self_balancing=balancing)
    assert [got[i].tolist() for i in range(clients)] == ref


OPTS = {
    "iid": {"kind": "iid"},
    "dirichlet": {"kind": "dirichlet", "alpha": 0.3, "min_partition_size": 0},
    "shards": {"kind": "shards", "shards_per_client": 2},
    "quantity": {"kind": "quantity", "distribution": "powerlaw", "min_partition_size": 3},
    "natural": {"kind": "natural"},
    "pathological": {"kind": "pathological", "classes_per_client": 2,
                     "class_assignment": "deterministic"},
}


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(sorted(OPTS)), seed=st.integers(0, 10**6), n=st.integers(60, 500),
       clients=st.integers(1, 15), holdout=st.sampled_from([0.0, 0.1, 0.5]))
def test_every_sample_in_exactly_one_client(kind, seed, n, clients, holdout):
    classes = 5
    y = _labels(seed, n, classes)
    group = np.random.default_rng(seed + 1).integers(0, 20, n)
    if kind == "natural":
        clients = min(clients, len(np.unique(group)))
    if kind == "pathological":
        clients = max(clients, classes)  # deterministic assignment then covers every class
    opts = P.validate(OPTS[kind])
    part = P.partition(opts, y, clients, seed, group)
    assert part.clients == clients
    used = np.sort(part.indices)
    if kind == "natural":  # only the first `clients` groups take part
        expect = np.flatnonzero(np.isin(group, np.unique(group)[:clients]))
    else:
        expect = np.arange(n)
    assert np.array_equal(used, expect)
    if kind == "quantity":
        assert part.sizes.min() >= 3
    if kind == "natural":
        for i in range(clients):
            assert len(np.unique(group[part[i]])) == 1
    train, held = P.holdout(part, holdout, np.random.default_rng(seed))
    for i in range(clients):
        both = np.concatenate([train[i], held[i]])
        assert np.array_equal(np.sort(both), np.sort(part[i]))
        assert len(held[i]) == (0 if holdout == 0 else
                                max(int(holdout * len(part[i])), int(len(part[i]) >= 2)))
    again = P.partition(opts, y, clients, seed, group)
    assert np.array_equal(again.indices, part.indices)
    assert np.array_equal(again.bounds, part.bounds)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), clients=st.integers(2, 30), min_size=st.integers(0, 20))
def test_dirichlet_min_partition_size_holds(seed, clients, min_size):
    y = _labels(seed, 1000, 10)
    try:
        part = P.dirichlet(y, clients, np.random.default_rng(seed), alpha=0.5,
                           min_partition_size=min_size)
    except ConfigError as exc:
        assert "min_partition_size" in str(exc)
        return
    assert part.sizes.min() >= min_size
    assert part.sizes.sum() == 1000


def _skew(part: P.Partition, y: np.ndarray, classes: int) -> float:
    """Mean total-variation distance of clients' label distributions from the global one."""
    glob = np.bincount(y, minlength=classes) / len(y)
    tv = []
    for i in range(part.clients):
        counts = np.bincount(y[part[i]], minlength=classes)
        if counts.sum():
            tv.append(0.5 * np.abs(counts / counts.sum() - glob).sum())
    return float(np.mean(tv))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_label_proportions_approach_iid_as_alpha_grows(seed):
    y = _labels(seed, 5000, 10)
    skews = [_skew(P.dirichlet(y, 10, np.random.default_rng(seed), alpha=a,
                               min_partition_size=0), y, 10)
             for a in (0.05, 1.0, 1000.0)]
    assert skews[0] > skews[1] > skews[2]
    assert skews[2] < 0.05  # near-IID: what sampling noise alone gives
    assert skews[0] > 0.5  # most clients hold a few classes


def test_different_seeds_give_different_partitions():
    y = _labels(0, 500, 10)
    opts = P.validate({"kind": "dirichlet", "alpha": 0.5})
    a, b = P.partition(opts, y, 10, 0), P.partition(opts, y, 10, 1)
    assert not np.array_equal(a.indices, b.indices)


def test_shards_hold_few_labels_each():
    y = np.repeat(np.arange(10), 100)
    part = P.shards(y, 50, np.random.default_rng(0), shards_per_client=2)
    assert all(len(np.unique(y[part[i]])) <= 2 for i in range(50))
    assert (part.sizes == 20).all()


@pytest.mark.parametrize("section, match", [
    ({"kind": "dirichlet", "alpha": 0}, r"alpha = 0; expected a number > 0"),
    ({"kind": "dirichlet", "alpha": -1.5}, r"alpha = -1.5"),
    ({"kind": "dirichlet", "alpha": [1, 0]}, r"alpha = \[1, 0\]"),
    ({"kind": "dirichlet", "alpah": 1}, r"has no key 'alpah'; did you mean 'alpha'"),
    ({"kind": "zipf"}, r"kind = 'zipf' is not allowed"),
    ({"kind": "dirichlet"}, r"alpha is missing"),
    ({"kind": "shards", "shards_per_client": 0}, r"shards_per_client = 0"),
    ({"kind": "quantity", "distribution": "normal"}, r"distribution = 'normal'"),
])
def test_bad_partition_config_names_key_and_value(section, match):
    with pytest.raises(ConfigError, match=match):
        P.validate(section)


def test_more_clients_than_samples_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"clients = 11 is more than the 10 training samples"):
        P.partition(P.validate({"kind": "iid"}), np.zeros(10, np.int64), 11, 0)


def test_user_partitioner_is_checked():
    y = np.zeros(10, np.int64)
    from kernel import registry

    registry.register("partitioners", "tests.twice", lambda labels, n, rng: [[0, 1], [1]])
    with pytest.raises(ConfigError, match="gave some sample to two clients"):
        P.partition(P.validate({"kind": "tests.twice"}), y, 2, 0)
