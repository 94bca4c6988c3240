"""The global sample order: epochs, weights, sharding across ranks and workers, resume and re-sharding."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from foundation.config import load_config
from foundation.data.sampler import (
    GlobalOrder,
    Shard,
    ShardedSampler,
    build_order,
    entry_probabilities,
    sample_rng,
    systematic_counts,
)
from stain.vocabulary import StainVocabulary

VOCAB = StainVocabulary()


def make_index(slide_sizes: list[int], labels: list[tuple[str, str]], mpps: list[list[float]] | None = None):
    """An index-shaped object: ``slide_sizes[j]`` entries for slide j, labelled ``labels[j]`` (stain, marker)."""
    slides = []
    for j, (stain, marker) in enumerate(labels):
        label = VOCAB.label(stain, marker)
        slides.append(SimpleNamespace(slide_id=f"s{j}", stain_id=label.stain_id, marker_id=label.marker_id))
    slide_col = np.repeat(np.arange(len(slide_sizes), dtype=np.int32), slide_sizes)
    if mpps is None:
        mpp_col = np.full(slide_col.size, 0.5, np.float32)
    else:
        mpp_col = np.concatenate([np.asarray(m, np.float32) for m in mpps])
    return SimpleNamespace(slides=slides, tiles={"slide": slide_col, "mpp": mpp_col})


def sampler_cfg(**kw):
    base = OmegaConf.to_container(load_config().data.sampler)
    base.update(kw)
    return base


def test_uniform_epoch_is_a_permutation_and_seeded():
    order = GlobalOrder(np.full(1000, 1.0), seed=3)
    e0, e1 = order.epoch(0), order.epoch(1)
    assert np.array_equal(np.sort(e0), np.arange(1000))
    assert np.array_equal(np.sort(e1), np.arange(1000))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(GlobalOrder(np.full(1000, 1.0), seed=3).epoch(1), e1)
    assert not np.array_equal(GlobalOrder(np.full(1000, 1.0), seed=4).epoch(0), e0)
    # positions run on across epochs: the order is infinite
    assert np.array_equal(order.entries(np.arange(1000, 2000)), e1)
    assert np.array_equal(order.entries([2999]), [order.epoch(2)[999]])


def test_systematic_counts_are_floor_or_ceil():
    rng = np.random.default_rng(0)
    p = rng.random(5000) ** 3
    p /= p.sum()
    counts = systematic_counts(p, 12345, rng)
    assert counts.sum() == 12345
    expected = 12345 * p
    assert np.all(counts >= np.floor(expected) - 1e-9) and np.all(counts <= np.ceil(expected) + 1e-9)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sharding_is_disjoint_and_complete(world_size):
    order = GlobalOrder(np.full(97, 1.0), seed=0)  # 97: batches straddle epoch boundaries
    batch, steps = 6, 20
    seen = []
    for rank in range(world_size):
        sampler = ShardedSampler(order, Shard(rank, world_size, batch), position=5)
        seen += [sampler.batch_positions(step) for step in range(steps)]
    seen = np.sort(np.concatenate(seen))
    assert np.array_equal(seen, np.arange(5, 5 + steps * world_size * batch))
    # the entries of the shards, put together, are the global order itself
    entries = np.concatenate([order.entries(np.arange(5 + t * world_size * batch, 5 + (t + 1) * world_size * batch))
                              for t in range(steps)])
    assert np.array_equal(entries, order.entries(np.arange(5, 5 + steps * world_size * batch)))


def run_ranks(order, world_size, batch, position, steps):
    """Consume ``steps`` steps on every rank; return (positions consumed, entries, the rank-0 state)."""
    samplers = [ShardedSampler(order, Shard(r, world_size, batch), position) for r in range(world_size)]
    positions, entries = [], []
    for _ in range(steps):
        for s in samplers:
            pos, ent = next(iter(s))
            positions.append(pos)
            entries.append(ent)
    states = [s.state_dict() for s in samplers]
    assert all(st == states[0] for st in states), "ranks disagree on the global position"
    return np.concatenate(positions), np.concatenate(entries), states[0]


@pytest.mark.parametrize(("world_a", "batch_a", "world_b", "batch_b"), [(2, 4, 1, 4), (1, 4, 2, 4), (2, 3, 4, 5)])
def test_resharding_keeps_the_global_order(world_a, batch_a, world_b, batch_b):
    p = np.random.default_rng(1).random(53)
    order = GlobalOrder(p, seed=11, epoch_length=40)
    pos_a, ent_a, state = run_ranks(order, world_a, batch_a, 0, steps=7)
    fresh = GlobalOrder(p, seed=11, epoch_length=40)  # a new process: nothing shared but the state
    sampler = ShardedSampler(fresh, Shard(0, world_b, batch_b))
    sampler.load_state_dict(state)
    pos_b, ent_b, _ = run_ranks(fresh, world_b, batch_b, sampler.position, steps=6)
    positions = np.concatenate([pos_a, pos_b])
    assert np.unique(positions).size == positions.size, "a sample was repeated"
    assert np.array_equal(np.sort(positions), np.arange(positions.size)), "a sample was skipped"
    by_position = np.empty(positions.size, np.int64)
    by_position[positions] = np.concatenate([ent_a, ent_b])
    assert np.array_equal(by_position, order.entries(np.arange(positions.size)))


def test_resume_gives_the_exact_next_batches():
    order = GlobalOrder(np.full(200, 1.0), seed=5)
    run = ShardedSampler(order, Shard(1, 2, 8))
    it = iter(run)
    for _ in range(9):
        next(it)
    state = run.state_dict()
    expected = [next(it) for _ in range(4)]
    resumed = ShardedSampler(GlobalOrder(np.full(200, 1.0), seed=5), Shard(1, 2, 8))
    resumed.load_state_dict(state)
    got = [b for b, _ in zip(resumed, range(4), strict=False)]
    for (p0, e0), (p1, e1) in zip(expected, got, strict=True):
        assert np.array_equal(p0, p1) and np.array_equal(e0, e1)


def test_state_from_another_order_is_refused():
    state = ShardedSampler(GlobalOrder(np.full(50, 1.0), seed=5), Shard(0, 1, 4)).state_dict()
    other = ShardedSampler(GlobalOrder(np.full(51, 1.0), seed=5), Shard(0, 1, 4))
    with pytest.raises(ValueError, match="num_entries"):
        other.load_state_dict(state)
    reseeded = ShardedSampler(GlobalOrder(np.full(50, 1.0), seed=6), Shard(0, 1, 4))
    with pytest.raises(ValueError, match="seed"):
        reseeded.load_state_dict(state)


def group_shares(index, order: GlobalOrder, key) -> dict:
    entries = order.epoch(0)
    keys = np.array([key(int(e)) for e in np.unique(entries)])
    counts = np.bincount(entries, minlength=len(index.tiles["slide"]))[np.unique(entries)]
    return {k: counts[keys == k].sum() / entries.size for k in np.unique(keys)}


def test_stain_and_slide_weights_are_honoured():
    # H&E: one huge slide and two small ones; IHC Ki67: one slide; IHC HER2: one slide.
    index = make_index([4000, 100, 100, 300, 500],
                       [("H&E", ""), ("H&E", ""), ("H&E", ""), ("IHC", "Ki67"), ("IHC", "HER2")])
    slide = index.tiles["slide"]
    length = 200_000

    natural = GlobalOrder(entry_probabilities(index, sampler_cfg(stain_power=1.0, slide_power=1.0), VOCAB), 0)
    assert np.array_equal(np.sort(natural.epoch(0)), np.arange(slide.size))  # uniform: one permutation

    cfg = sampler_cfg(stain_power=0.0, slide_power=0.0)
    order = GlobalOrder(entry_probabilities(index, cfg, VOCAB), seed=0, epoch_length=length)
    shares = group_shares(index, order, lambda e: int(slide[e]))
    # three stain groups equal (1/3 each); H&E's three slides equal inside their third
    assert shares[0] == pytest.approx(1 / 9, abs=0.002) and shares[1] == pytest.approx(1 / 9, abs=0.002)
    assert shares[3] == pytest.approx(1 / 3, abs=0.002) and shares[4] == pytest.approx(1 / 3, abs=0.002)

    weighted = sampler_cfg(stain_power=0.0, slide_power=1.0, stain_weights={"IHC": 2.0, "IHC/Ki67": 6.0})
    order = GlobalOrder(entry_probabilities(index, weighted, VOCAB), seed=0, epoch_length=length)
    shares = group_shares(index, order, lambda e: int(slide[e]))
    # groups: H&E 1, Ki67 6 (specific key wins), HER2 2 (the stain-wide key) -> 1/9, 6/9, 2/9
    assert sum(shares[j] for j in range(3)) == pytest.approx(1 / 9, abs=0.002)
    assert shares[0] == pytest.approx(4000 / 4200 / 9, abs=0.002)  # slide_power 1: natural inside H&E
    assert shares[3] == pytest.approx(6 / 9, abs=0.002) and shares[4] == pytest.approx(2 / 9, abs=0.002)


def test_mpp_weights_are_honoured():
    index = make_index([1600, 400], [("H&E", ""), ("H&E", "")],
                       mpps=[[0.5] * 1200 + [1.0] * 300 + [2.0] * 100, [0.5] * 300 + [1.0] * 100])
    mpp = index.tiles["mpp"]
    cfg = sampler_cfg(slide_power=1.0, mpp_power=0.0, mpp_weights={"0.5": 1.0, "1.0": 1.0, "2.0": 2.0})
    order = GlobalOrder(entry_probabilities(index, cfg, VOCAB), seed=2, epoch_length=100_000)
    shares = group_shares(index, order, lambda e: float(mpp[e]))
    # slide 0 (0.8 of the mass) splits 1:1:2 over its three sizes, slide 1 (0.2) 1:1 over its two
    assert shares[2.0] == pytest.approx(0.8 * 0.5, abs=0.002)
    assert shares[0.5] == pytest.approx(0.8 * 0.25 + 0.2 * 0.5, abs=0.002)


def test_bad_weight_keys_are_named():
    index = make_index([10, 10], [("H&E", ""), ("IHC", "Ki67")])
    with pytest.raises(ValueError, match="'Eosin-only'"):
        entry_probabilities(index, sampler_cfg(stain_weights={"Eosin-only": 2.0}), VOCAB)
    with pytest.raises(ValueError, match=r"'0\.25' matches no index entry"):
        entry_probabilities(index, sampler_cfg(mpp_weights={"0.25": 2.0}), VOCAB)
    with pytest.raises(ValueError, match="zero probability"):
        entry_probabilities(index, sampler_cfg(stain_weights={"H&E": 0, "IHC": 0}), VOCAB)


def test_build_order_reads_the_config():
    index = make_index([30, 20], [("H&E", ""), ("IHC", "Ki67")])
    cfg = load_config(overrides=["meta.seed=9", "data.sampler.epoch_length=64"])
    order = build_order(index, cfg)
    assert order.seed == 9 and order.epoch_length == 64 and len(order) == 50
    cfg = load_config(overrides=["meta.seed=9", "data.sampler.seed=4"])
    assert build_order(index, cfg).seed == 4


def test_replacements_and_sample_rngs_are_deterministic():
    p = np.array([0.0, 0.7, 0.3])
    order = GlobalOrder(p, seed=1)
    draws = [order.replacement(pos, 1) for pos in range(3000)]
    assert draws == [GlobalOrder(p, seed=1).replacement(pos, 1) for pos in range(3000)]
    counts = np.bincount(draws, minlength=3) / 3000
    assert counts[0] == 0 and counts[1] == pytest.approx(0.7, abs=0.03)
    assert sample_rng(1, 10).random() == sample_rng(1, 10).random()
    assert sample_rng(1, 10).random() != sample_rng(1, 11).random()
    assert sample_rng(1, 10, attempt=1).random() != sample_rng(1, 10).random()
    # the spelled-out construction is default_rng's: the same stream (the samples of earlier runs keep their bits)
    for seed, position, attempt in ((0, 0, 0), (1, 10, 2), (7, 2**40, 0)):
        ref = np.random.default_rng([0x53414D50, seed, position, attempt])
        rng = sample_rng(seed, position, attempt)
        assert np.array_equal(rng.random(5), ref.random(5)) and rng.integers(0, 4) == ref.integers(0, 4)
