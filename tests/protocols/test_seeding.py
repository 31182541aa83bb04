"""protocols.seeding: the reseeded generator draws exactly what default_rng(i) draws."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import seeding
from protocols.gossip import initial_vector


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 2**33), min_size=1, max_size=30))
def test_seed_states_are_numpys_seed_sequence_states(ids: list[int]) -> None:
    small = [i for i in ids if i < 2**32]
    if small:
        got = seeding.seed_states(np.array(small, np.int64))
        for i, row in zip(small, got):
            assert row.tolist() == np.random.SeedSequence(i).generate_state(4, np.uint64).tolist()


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(0, 10_000), st.integers(0, 2**40)), min_size=1,
                    max_size=20),
       dim=st.integers(1, 40))
def test_every_draw_equals_default_rngs_in_any_order_of_ids(ids: list[int], dim: int) -> None:
    seeds = seeding.Seeds()
    for i in ids:
        want = np.random.default_rng(i)
        g = seeds.generator(i)
        assert g.standard_normal(dim).tolist() == want.standard_normal(dim).tolist()
        assert g.integers(0, 1000, 3).tolist() == want.integers(0, 1000, 3).tolist()
        assert initial_vector(i, dim).tobytes() == (
            np.random.default_rng(i).standard_normal(dim).astype(np.float32).tobytes())


def test_a_whole_block_of_consecutive_ids() -> None:
    seeds = seeding.Seeds()
    for i in range(4090, 4200):  # across a block boundary
        assert seeds.generator(i).random() == np.random.default_rng(i).random()
