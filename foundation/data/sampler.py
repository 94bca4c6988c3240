"""The global sample order: seeded, weighted, infinite, sharded by rank and worker, resumable by position.

Weights (all from ``cfg.data.sampler``)
---------------------------------------
The probability of index entry ``i`` is a product down a hierarchy, each level normalised inside its parent::

    p_i = P(stain group) * P(slide | stain group) * P(pixel size | slide) / n(slide, pixel size)

    P(stain group s)      ~ stain_weight[s] * n_s ** stain_power        (groups: stain, or stain/marker for IHC)
    P(slide j | s)        ~ n_j ** slide_power                          (n_j: entries of slide j)
    P(mpp m | slide j)    ~ mpp_weight[m] * n_jm ** mpp_power           (n_jm: entries of slide j at pixel size m)

A power of 1 keeps the natural share (proportional to the number of entries), 0 gives every group the same share
and 0.5 is in between; with every power 1 and every weight 1 the distribution is uniform over the entries. So
``slide_power < 1`` keeps one huge slide from dominating its stain, ``stain_power < 1`` lifts rare stains, and
``mpp_power: 0`` plus ``mpp_weights`` sets magnification shares directly (Virchow2-style balancing).

Epochs
------
Epoch ``e`` is ``epoch_length`` entries (default: the number of entries). Entry ``i`` appears ``floor(L p_i)`` or
``ceil(L p_i)`` times, chosen by systematic sampling (one uniform offset), and the resulting multiset is shuffled
with a Generator seeded from ``(seed, epoch)``. Why not i.i.d. draws: systematic counts have the least variance
for the given weights, every entry whose expected count is at least 1 is visited, and with uniform weights an epoch
is exactly one permutation of all entries (no repeats, no gaps). Epochs follow each other forever.

Sharding layout
---------------
The run consumes the global order from a start position ``g0``. Step ``t`` takes the ``W * B`` positions
``[g0 + t*W*B, g0 + (t+1)*W*B)`` (``W`` ranks, ``B`` samples per rank); rank ``r`` takes the contiguous block
``g0 + t*W*B + r*B + [0, B)``. Inside a rank, the pipeline's reader workers (``data.pipeline.reader_workers``)
each build whole rank batches: DALI hands batch ``t`` to one worker, which computes it from ``t`` alone
(:meth:`Shard.positions`). Every position is taken exactly once. After ``t`` steps by all ranks the consumed set
is exactly the prefix ``[0, g0 + t*W*B)`` of the global order, so the state is one integer (the global position)
and it resumes on any world size or batch size without repeating or skipping a sample.

Per-sample randomness
---------------------
Every random choice about a sample (magnification, crop windows, flips, turns, stain and colour jitter) comes from
:func:`sample_rng` seeded by ``(seed, position, attempt)``: independent of the batch, rank, worker and world size,
so a re-sharded or resumed run produces bit-identical samples. iBOT masks spread their ratios over a batch
(DINOv2), so they are drawn per batch, seeded by the batch's first position: a resume reproduces them exactly, a
re-shard to another batch size draws new ones.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stain.vocabulary import StainLabel, StainVocabulary

# Stream tags keep the Generators of the different uses of (seed, ...) independent of each other.
_STREAM_EPOCH = 0x45504F43  # "EPOC"
_STREAM_SAMPLE = 0x53414D50  # "SAMP"
_STREAM_REPLACE = 0x5245504C  # "REPL"
_EPOCH_CACHE = 2  # epochs kept in memory: the current one and its neighbour at a boundary


def sample_rng(seed: int, position: int, attempt: int = 0) -> np.random.Generator:
    """The Generator that draws every random parameter of the sample at global ``position``."""
    # exactly np.random.default_rng(entropy), spelled out: skips default_rng's argument dispatch (a quarter of
    # the cost, paid once per sample)
    entropy = [_STREAM_SAMPLE, int(seed), int(position), int(attempt)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def hierarchical_probabilities(
    slide: np.ndarray,
    group_of_slide: np.ndarray,
    mpp_id: np.ndarray,
    group_weight: np.ndarray,
    mpp_weight: np.ndarray,
    stain_power: float,
    slide_power: float,
    mpp_power: float,
) -> np.ndarray:
    """Per-entry probabilities (float64, sum 1) following the hierarchy in the module docstring.

    ``slide`` and ``mpp_id`` are per entry; ``group_of_slide`` maps a slide to its stain group;
    ``group_weight`` and ``mpp_weight`` are multipliers per group id and per pixel-size id.
    """
    slide = np.asarray(slide, dtype=np.int64)
    mpp_id = np.asarray(mpp_id, dtype=np.int64)
    group_of_slide = np.asarray(group_of_slide, dtype=np.int64)
    group_weight = np.asarray(group_weight, dtype=np.float64)
    mpp_weight = np.asarray(mpp_weight, dtype=np.float64)
    if slide.size == 0:
        raise ValueError("the index has no entries to sample from")

    n_slides = group_of_slide.size
    group = group_of_slide[slide]
    n_group = np.bincount(group, minlength=group_weight.size).astype(np.float64)
    group_mass = np.where(n_group > 0, group_weight * n_group**stain_power, 0.0)

    n_slide = np.bincount(slide, minlength=n_slides).astype(np.float64)
    slide_w = np.where(n_slide > 0, n_slide**slide_power, 0.0)
    slide_w_in_group = np.bincount(group_of_slide, weights=slide_w, minlength=group_weight.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        slide_mass = group_mass[group_of_slide] * np.where(slide_w > 0, slide_w / slide_w_in_group[group_of_slide], 0)

    n_mpp = mpp_weight.size
    cell = slide * n_mpp + mpp_id
    n_cell = np.bincount(cell, minlength=n_slides * n_mpp).astype(np.float64)
    cell_w = np.where(n_cell > 0, np.tile(mpp_weight, n_slides) * n_cell**mpp_power, 0.0)
    cell_w_in_slide = cell_w.reshape(n_slides, n_mpp).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cell_share = np.where(cell_w > 0, cell_w / np.repeat(cell_w_in_slide, n_mpp), 0.0)
        entry_p = (np.repeat(slide_mass, n_mpp) * cell_share / np.maximum(n_cell, 1))[cell]
    total = entry_p.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("sampler weights give every index entry zero probability (check sampler.stain_weights "
                         "and sampler.mpp_weights)")
    return entry_p / total


def systematic_counts(p: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Counts ``c_i`` in ``{floor(L p_i), ceil(L p_i)}`` summing to ``L``, by systematic sampling."""
    cum = np.cumsum(p, dtype=np.float64) * length
    # Snap float noise onto integers so that L p_i = 1 gives a count of exactly 1 whatever the offset.
    near = np.abs(cum - np.rint(cum)) < 1e-6
    cum[near] = np.rint(cum[near])
    cum[-1] = length
    u = rng.random()
    ends = np.floor(cum + u).astype(np.int64)
    starts = np.concatenate(([np.int64(np.floor(u))], ends[:-1]))
    return ends - starts


class GlobalOrder:
    """The infinite, seeded sequence of index entries that all ranks consume together."""

    def __init__(self, probabilities: np.ndarray, seed: int, epoch_length: int | None = None) -> None:
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or p.size == 0:
            raise ValueError(f"probabilities must be a non-empty 1-D array, got shape {p.shape}")
        self.p = p / p.sum()
        self.seed = int(seed)
        self.epoch_length = int(epoch_length) if epoch_length else int(p.size)
        if self.epoch_length <= 0:
            raise ValueError(f"sampler.epoch_length must be positive, got {epoch_length}")
        self._dtype = np.int32 if p.size < np.iinfo(np.int32).max else np.int64
        self._cdf = np.cumsum(self.p)
        self._cdf[-1] = 1.0
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()
        digest = hashlib.blake2b(self.p.tobytes(), digest_size=8)
        digest.update(np.int64(self.epoch_length).tobytes())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return int(self.p.size)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_epochs"] = OrderedDict()  # recomputed where needed: cheaper than shipping it to a reader process
        return state

    def epoch(self, e: int) -> np.ndarray:
        """The entries of epoch ``e`` in order (cached)."""
        if e in self._epochs:
            self._epochs.move_to_end(e)
            return self._epochs[e]
        rng = np.random.default_rng([_STREAM_EPOCH, self.seed, int(e)])
        counts = systematic_counts(self.p, self.epoch_length, rng)
        order = rng.permutation(np.repeat(np.arange(self.p.size, dtype=self._dtype), counts))
        self._epochs[e] = order
        while len(self._epochs) > _EPOCH_CACHE:
            self._epochs.popitem(last=False)
        return order

    def entries(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Index entries at the given global positions (any order, may span epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.min() < 0:
            raise ValueError(f"global positions must be >= 0, got {positions.min()}")
        epochs, offsets = np.divmod(positions, self.epoch_length)
        out = np.empty(positions.shape, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch(int(e))[offsets[sel]]
        return out

    def replacement(self, position: int, attempt: int) -> int:
        """A weighted, deterministic substitute entry for the sample at ``position`` whose read failed."""
        rng = np.random.default_rng([_STREAM_REPLACE, self.seed, int(position), int(attempt)])
        return int(min(np.searchsorted(self._cdf, rng.random(), side="right"), self.p.size - 1))


@dataclass(frozen=True)
class Shard:
    """This process's place in the layout: rank of ``world_size``, ``batch_size`` samples per rank and step."""

    rank: int
    world_size: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.world_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def positions(self, start: int, step: int) -> np.ndarray:
        """Global positions of this rank's batch at ``step`` counted from the global position ``start``."""
        first = int(start) + int(step) * self.global_batch + self.rank * self.batch_size
        return np.arange(first, first + self.batch_size, dtype=np.int64)


class ShardedSampler:
    """One rank's view of the global order: batches of global positions, a resumable state."""

    def __init__(self, order: GlobalOrder, shard: Shard, position: int = 0) -> None:
        self.order = order
        self.shard = shard
        self.position = int(position)

    def batch_positions(self, step: int) -> np.ndarray:
        """Positions of this rank's batch ``step`` batches after the current position (pure; no state change)."""
        return self.shard.positions(self.position, step)

    def advance(self, steps: int = 1) -> None:
        """Mark ``steps`` steps as consumed by all ranks."""
        self.position += int(steps) * self.shard.global_batch

    def __iter__(self):
        while True:
            positions = self.batch_positions(0)
            self.advance()
            yield positions, self.order.entries(positions)

    def state_dict(self) -> dict[str, Any]:
        """Global position consumed by all ranks together, plus what identifies the order."""
        return {
            "position": self.position,
            "seed": self.order.seed,
            "epoch_length": self.order.epoch_length,
            "num_entries": len(self.order),
            "fingerprint": self.order.fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state['position']``; refuses a state saved for another index, seed or weighting."""
        for key in ("num_entries", "seed", "epoch_length", "fingerprint"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state does not match this run: {key} is {state[key]!r} in the "
                                 f"checkpoint and {mine!r} here (index, seed or sampler weights changed)")
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"sampler state position must be >= 0, got {position}")
        self.position = position


# ------------------------------------------------------------------ construction from the index and the config


def _stain_group_weights(labels: Sequence[StainLabel], weights_cfg: Mapping[str, Any],
                         vocab: StainVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Group id per slide (one group per distinct stain/marker label) and a weight per group."""
    by_label: dict[StainLabel, float] = {}
    by_stain: dict[int, float] = {}
    for key, value in (weights_cfg or {}).items():
        weight = float(value)
        if weight < 0:
            raise ValueError(f"sampler.stain_weights[{key!r}] must be >= 0, got {value}")
        stain, _, marker = str(key).partition("/")
        try:
            if marker:
                by_label[StainLabel(vocab.stain_id(stain), vocab.marker_id(marker))] = weight
            else:
                by_stain[vocab.stain_id(stain)] = weight
        except KeyError as err:
            raise ValueError(f"sampler.stain_weights: key {key!r}: {err.args[0]}") from None
    groups: dict[StainLabel, int] = {}
    group_of_slide = np.array([groups.setdefault(label, len(groups)) for label in labels], dtype=np.int64)
    group_weight = np.ones(len(groups), dtype=np.float64)
    for label, gid in groups.items():
        group_weight[gid] = by_label.get(label, by_stain.get(label.stain_id, 1.0))
    return group_of_slide, group_weight


def _mpp_ids_and_weights(mpp: np.ndarray, weights_cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    values, mpp_id = np.unique(np.asarray(mpp, dtype=np.float32), return_inverse=True)
    weight = np.ones(values.size, dtype=np.float64)
    for key, value in (weights_cfg or {}).items():
        try:
            target = float(key)
        except ValueError:
            raise ValueError(f"sampler.mpp_weights: key {key!r} is not a pixel size in µm/px") from None
        if float(value) < 0:
            raise ValueError(f"sampler.mpp_weights[{key!r}] must be >= 0, got {value}")
        match = np.isclose(values, target, rtol=1e-4, atol=0)
        if not match.any():
            raise ValueError(f"sampler.mpp_weights: {key!r} matches no index entry (index pixel sizes: "
                             f"{[round(float(v), 4) for v in values]})")
        weight[match] = float(value)
    return mpp_id.reshape(-1), weight


def entry_probabilities(index: Any, sampler_cfg: Mapping[str, Any], vocab: StainVocabulary) -> np.ndarray:
    """Per-entry probabilities of a :class:`~foundation.slides.index.TileIndex` under ``cfg.data.sampler``."""
    labels = [StainLabel(int(s.stain_id), int(s.marker_id)) for s in index.slides]
    group_of_slide, group_weight = _stain_group_weights(labels, sampler_cfg.get("stain_weights"), vocab)
    mpp_id, mpp_weight = _mpp_ids_and_weights(index.tiles["mpp"], sampler_cfg.get("mpp_weights"))
    return hierarchical_probabilities(
        slide=index.tiles["slide"], group_of_slide=group_of_slide, mpp_id=mpp_id,
        group_weight=group_weight, mpp_weight=mpp_weight,
        stain_power=float(sampler_cfg["stain_power"]), slide_power=float(sampler_cfg["slide_power"]),
        mpp_power=float(sampler_cfg["mpp_power"]),
    )


def build_order(index: Any, cfg: Any) -> GlobalOrder:
    """The global order of a tile index under the full config (``cfg.data.sampler``, ``cfg.meta.seed``)."""
    sampler_cfg = cfg.data.sampler
    seed = sampler_cfg.seed if sampler_cfg.seed is not None else cfg.meta.seed
    vocab = StainVocabulary.from_config(cfg.get("stain"))
    return GlobalOrder(entry_probabilities(index, sampler_cfg, vocab), seed=int(seed),
                       epoch_length=sampler_cfg.epoch_length)
