"""ZeRO-3 leaf blocks: each transformer block gathered, released and reduced as one unit.

ZeRO-3 hooks every submodule to gather its weights before its forward and release them after, in the
backward too. A ViT block has about ten submodules, so each step makes thousands of hook calls: host work
the GPU waits on (one H100, MAE ViT-L: 0.28x a plain step). Marked as a DeepSpeed leaf module
(``deepspeed.utils.set_z3_leaf_module``), a block is one unit: all its weights are fetched when it is entered
and its gradients are reduced when its backward ends.

That reduction is only right if the block runs once per step with gradients: the backward of a first call
would reduce a partial gradient. The backbone calls each block once with every crop group
(:class:`foundation.models.backbone.MultiCropBlock`), and :func:`mark_leaf_blocks` installs a check that stops
a step in which a block is called a second time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from foundation.train.engine import transformer_blocks

_CALLS = "_foundation_leaf_calls"


def _outside_backward() -> bool:
    # Activation checkpointing calls a block again while the backward runs (its recomputation): not a second use.
    # torch.utils.checkpoint asks autograd the same way.
    return torch._C._current_graph_task_id() == -1


def _count_call(block: nn.Module, args: tuple[Any, ...]) -> None:
    if not (block.training and torch.is_grad_enabled() and _outside_backward()):
        return
    calls = getattr(block, _CALLS, 0) + 1
    setattr(block, _CALLS, calls)
    if calls > 1:
        raise RuntimeError(
            f"ZeRO-3 leaf block {block.__class__.__name__} ran {calls} times with gradients in one forward: "
            "its gradient would be reduced after the first backward only. Call each block once per step (the "
            "backbone's forward_features_list takes every crop group at once) or set "
            "train.zero3_leaf_modules=false")


def mark_leaf_blocks(module: nn.Module, step_root: nn.Module | None = None) -> int:
    """Mark every transformer block of ``module`` a ZeRO-3 leaf; returns how many.

    Call before ``deepspeed.initialize``, which installs the hooks. With ``step_root`` (the module the engine
    calls once per micro-step), a block called twice with gradients between two calls of it raises.
    """
    from deepspeed.utils import set_z3_leaf_module

    blocks = transformer_blocks(module)
    for block in blocks:
        set_z3_leaf_module(block, True)
    if step_root is not None:
        for block in blocks:
            block.register_forward_pre_hook(_count_call)

        def new_step(_: nn.Module, __: tuple[Any, ...]) -> None:
            for block in blocks:
                setattr(block, _CALLS, 0)

        step_root.register_forward_pre_hook(new_step)
    return len(blocks)
