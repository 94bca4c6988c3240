"""The EMA teacher module: a frozen copy of the student parts an objective tracks."""

from __future__ import annotations

import copy

from torch import nn


class Teacher(nn.ModuleDict):
    """Deep copy of the tracked student parts (``backbone``, heads): no gradients, always in eval mode.

    Eval mode switches off what must not act on the teacher: drop path and stain-token dropout.
    """

    def __init__(self, student: nn.ModuleDict) -> None:
        super().__init__({name: copy.deepcopy(module) for name, module in student.items()})
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode whatever the trainer asks (``module.train()`` recurses into it)."""
        return super().train(False)


def ema_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(student, teacher)`` parameter pairs by name, in the student's order; names must match exactly."""
    teacher = getattr(teacher, "module", teacher)  # a DeepSpeed engine wraps the module
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        only_s = sorted(set(s_params) - set(t_params))[:5]
        only_t = sorted(set(t_params) - set(s_params))[:5]
        raise ValueError(f"teacher does not match the student: only in student {only_s}, only in teacher {only_t}")
    for name, param in s_params.items():
        if param.shape != t_params[name].shape and not hasattr(param, "ds_id"):
            raise ValueError(f"teacher parameter {name} has shape {list(t_params[name].shape)}, "
                             f"student {list(param.shape)}")
    return [(s_params[name], t_params[name]) for name in s_params]


class EMATeacherMixin:
    """``build_teacher`` / ``teacher_pairs`` for objectives whose EMA teacher tracks all of ``self.student``."""

    student: nn.ModuleDict

    def build_teacher(self) -> Teacher:
        return Teacher(self.student)

    def teacher_pairs(self, teacher: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return ema_pairs(self.student, teacher)
