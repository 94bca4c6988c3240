"""The EMA teacher at every ZeRO stage, behind one interface (:class:`EMATeacher`).

``teacher <- m * teacher + (1 - m) * student`` over the ``(student, teacher)`` pairs the objective names,
always accumulated in fp32 (a bf16 accumulator cannot resolve ``(1 - m) * step`` at ``m`` near 1).

* ZeRO-0/1/2 (:class:`ReplicatedTeacher`): every rank holds the whole fp32 teacher and updates it with
  two ``torch._foreach_*`` calls from the student's **module parameters**. In fp32 runs they are the
  weights themselves. In bf16/fp16 runs they are the low-precision copy DeepSpeed refreshes from the
  fp32 master after each step: at these stages the master is partitioned over ranks, so reading it would
  cost an fp32 all-gather of the model per step, while the difference (at most half a bf16 ulp of each
  weight, mostly averaged out by the EMA) is no larger than the bf16 rounding the teacher's forward
  applies under autocast anyway.
* ZeRO-3 (:class:`PartitionedTeacher`): the teacher is a second engine (ZeRO-3, fp32, no optimizer) and
  so partitioned exactly like the student: each rank updates only its own shard, in place on
  ``param.ds_tensor``, from the student's fp32 master shard. No gather per step.

A teacher's checkpoint is per rank when :attr:`EMATeacher.sharded` (each rank saves its shards) and one
file otherwise (see :mod:`foundation.train.checkpoint`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from foundation.train.engine import initialize_engine, teacher_deepspeed_config, zero_stage

Pairs = Sequence[tuple[nn.Parameter, nn.Parameter]]


class EMATeacher(ABC):
    """An fp32 EMA copy of (part of) the student; ``module`` is what the objective's forward receives."""

    sharded: bool

    def __init__(self, module: nn.Module, pairs: Pairs) -> None:
        if not pairs:
            raise ValueError("the objective built a teacher but named no (student, teacher) parameter pairs")
        self.module = module
        self.pairs = list(pairs)
        self.module.requires_grad_(False)
        self.module.eval()

    @abstractmethod
    def update(self, momentum: float) -> None:
        """One EMA step with ``momentum`` (1.0 leaves the teacher unchanged)."""

    @abstractmethod
    def local_state(self) -> dict[str, torch.Tensor]:
        """What this rank saves: the full state, or its shards when :attr:`sharded`."""

    @abstractmethod
    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`local_state` returned on this rank."""

    def load_full_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the whole fp32 teacher (any world size; each rank keeps its own part at ZeRO-3)."""
        self.load_local_state(state)

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole teacher on the CPU in fp32 (a collective at ZeRO-3: call it on every rank)."""


def _check_keys(got: Mapping[str, torch.Tensor], expected: Sequence[str], what: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")


class ReplicatedTeacher(EMATeacher):
    """ZeRO-0/1/2: the whole fp32 teacher on every rank."""

    sharded = False

    def __init__(self, module: nn.Module, pairs: Pairs, device: torch.device) -> None:
        module.to(device=device, dtype=torch.float32)
        super().__init__(module, pairs)
        self._teacher = [t for _, t in self.pairs]
        self._student = [s for s, _ in self.pairs]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        torch._foreach_mul_(self._teacher, momentum)
        torch._foreach_add_(self._teacher, self._student, alpha=1.0 - momentum)

    def local_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(dict(state), strict=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.local_state()


class PartitionedTeacher(EMATeacher):
    """ZeRO-3: the teacher partitioned like the student, each rank updating its own shards."""

    sharded = True

    def __init__(self, engine: object, pairs: Pairs) -> None:
        super().__init__(engine.module, pairs)  # type: ignore[attr-defined]
        self.engine = engine
        for student, teacher in self.pairs:
            if not hasattr(student, "ds_tensor") or not hasattr(teacher, "ds_tensor"):
                raise TypeError("PartitionedTeacher needs ZeRO-3 partitioned student and teacher parameters")
            if student.ds_tensor.numel() != teacher.ds_tensor.numel():
                raise ValueError(f"student and teacher shards differ: {student.ds_tensor.numel()} vs "
                                 f"{teacher.ds_tensor.numel()} elements (shape {tuple(student.ds_shape)})")

    def _student_fp32_shards(self) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param

        shards = []
        for student, _ in self.pairs:
            master = safe_get_local_fp32_param(student) if student.requires_grad else None
            # A frozen student parameter has no fp32 master: its own (unchanging) shard is the source.
            shards.append(master if master is not None else student.ds_tensor.float())
        return shards

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        teacher = [t.ds_tensor for _, t in self.pairs]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, self._student_fp32_shards(), alpha=1.0 - momentum)

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.named_parameters())

    def local_state(self) -> dict[str, torch.Tensor]:
        state = {f"shard.{name}": p.ds_tensor.detach().cpu().clone() for name, p in self._named_params()}
        state.update({f"buffer.{name}": b.detach().cpu().clone() for name, b in self.module.named_buffers()})
        return state

    def load_local_state(self, state: Mapping[str, torch.Tensor]) -> None:
        params = self._named_params()
        buffers = list(self.module.named_buffers())
        expected = [f"shard.{n}" for n, _ in params] + [f"buffer.{n}" for n, _ in buffers]
        _check_keys(state, expected, "teacher shard file")
        with torch.no_grad():
            for name, p in params:
                shard = state[f"shard.{name}"]
                if shard.numel() != p.ds_tensor.numel():
                    raise ValueError(f"teacher shard {name}: {shard.numel()} elements saved, "
                                     f"{p.ds_tensor.numel()} here (another world size? convert the checkpoint)")
                p.ds_tensor.copy_(shard)
            for name, b in buffers:
                b.copy_(state[f"buffer.{name}"])

    def load_full_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Cut each full tensor as DeepSpeed partitions it (flattened, padded to a multiple of the world size,
        equal slices in rank order) and keep this rank's slice."""
        import torch.distributed as dist

        params = self._named_params()
        buffers = list(self.module.named_buffers())
        _check_keys(state, [n for n, _ in params] + [n for n, _ in buffers], "full teacher state")
        rank, world = dist.get_rank(), dist.get_world_size()
        with torch.no_grad():
            for name, p in params:
                full = state[name].reshape(-1).float()
                if full.numel() != p.ds_numel:
                    raise ValueError(f"teacher {name}: {full.numel()} elements saved, {p.ds_numel} here")
                per_rank = p.ds_tensor.numel()
                padded = torch.zeros(per_rank * world, dtype=full.dtype)
                padded[: full.numel()] = full
                p.ds_tensor.copy_(padded[rank * per_rank:(rank + 1) * per_rank])
            for name, b in buffers:
                b.copy_(state[name])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        params = self._named_params()
        with GatheredParameters([p for _, p in params], modifier_rank=None):
            out = {name: p.detach().float().cpu().clone() for name, p in params}
        out.update({name: b.detach().cpu().clone() for name, b in self.module.named_buffers()})
        return out


def init_teacher_weights(pairs: Pairs) -> None:
    """Copy the student's tracked weights into the teacher (before either is partitioned or cast)."""
    with torch.no_grad():
        for student, teacher in pairs:
            if student.shape != teacher.shape:
                raise ValueError(f"teacher pair shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
            teacher.copy_(student)


def wrap_teacher(module: nn.Module, pairs: Pairs, student_ds_config: Mapping[str, object],
                 device: torch.device) -> EMATeacher:
    """The teacher for the student's ZeRO stage (call after the student engine exists)."""
    if zero_stage(student_ds_config) == 3:
        engine = initialize_engine(module, None, teacher_deepspeed_config(student_ds_config))
        return PartitionedTeacher(engine, pairs)
    return ReplicatedTeacher(module, pairs, device)
