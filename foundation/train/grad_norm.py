"""Gradient norm and clipping of DeepSpeed's ZeRO-1/2 optimizer without per-parameter or per-group host work.

DeepSpeed 0.19 (``DeepSpeedZeroOptimizer``) computes the norm it clips with group by group, and in each group with
a Python loop over the parameter tensors (a cast, a norm and a device copy each), reduces each group's norm over
the ranks, masks it with a scalar tensor built on the host (a synchronous host-to-device copy), and then, per group
again, asks the host whether the norm is valid before scaling the gradients (a device synchronisation). On one
H100 that host work left the GPU idle for a sixth to a third of our step (``benchmarks/RESULTS.md``); iBOT, with
one optimizer group per layer (layer-wise LR decay), paid it 54 times per step.

:func:`use_foreach_clipping` gives one optimizer instance:

- ``scaled_global_norm``: every gradient's fp32 norm in one ``torch._foreach_norm`` call, one reduction over the
  ranks, infinity when any gradient is not finite (what DeepSpeed's group combination returns then);
- ``unscale_and_clip_grads``: the same scale factor computed on the device (an invalid norm becomes infinity with
  ``torch.where`` instead of a host branch), so finite gradients get the same values. When the norm is not finite
  DeepSpeed's scale zeroes the finite entries but leaves NaN/inf ones; here those are zeroed too, so with
  ``train.grad_overflow_check: false`` such a step updates no weight from its gradients and no NaN reaches them.

Cases these do not cover (CPU offload, MoE, Muon, pipeline-replicated parameters, another norm type, a norm that
is not a tensor) go to DeepSpeed's own methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

L2 = 2.0


def _selected_gradients(optimizer: Any) -> list[torch.Tensor] | None:
    """The gradients DeepSpeed's norm counts (no alignment padding, model-parallel copies once); None: not covered."""
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter

    grads: list[torch.Tensor] = []
    for i, params in enumerate(optimizer.params_in_partition):
        if optimizer._muon_update_lacks_loss_scale(i) or any(getattr(p, PIPE_REPLICATED, False) for p in params):
            return None
        gradients = (g for g in optimizer.averaged_gradients[i] if not getattr(g, "_zero_padding", False))
        grads += [g.detach() for g, p in zip(gradients, params, strict=False)
                  if is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0]
    return grads


def _scaled_global_norm(optimizer: Any, plain: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.zero.utils import get_norm_dtype

    def scaled_global_norm(norm_type: float = L2) -> torch.Tensor:
        grads = _selected_gradients(optimizer) if float(norm_type) == L2 else None
        if grads is None:
            return plain(norm_type)
        if grads:
            total = torch.stack(torch._foreach_norm(grads, L2, dtype=get_norm_dtype())).pow(L2).sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        ds_comm.all_reduce(total, op=ds_comm.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=ds_comm.ReduceOp.SUM)
        total = total.sqrt()
        return torch.where(torch.isfinite(total), total, torch.full_like(total, float("inf")))

    return scaled_global_norm


def _unscale_and_clip(optimizer: Any, plain: Callable[..., None]) -> Callable[..., None]:
    def unscale_and_clip_grads(grad_groups_flat: list[Any], total_norm: Any) -> None:
        if optimizer.clip_grad == 0.0 and optimizer.loss_scale == 1.0:
            return
        if not torch.is_tensor(total_norm):
            plain(grad_groups_flat, total_norm)
            return
        combined_scale = optimizer.loss_scale
        if optimizer.clip_grad > 0.0:
            valid = torch.isfinite(total_norm) & (total_norm >= 0)
            clip_norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
            # DeepSpeed's arithmetic, in its order: the same scale, so the same gradients
            clip = ((clip_norm / optimizer.loss_scale) + 1e-6) / optimizer.clip_grad
            combined_scale = torch.clamp(clip, min=1.0) * optimizer.loss_scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else [grad]:
                g.data.mul_(1.0 / combined_scale)
                if optimizer.clip_grad > 0.0:
                    # a non-finite norm made the scale 0: finite entries are 0 now, and so are inf/NaN ones
                    g.data.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    return unscale_and_clip_grads


def use_foreach_clipping(optimizer: Any) -> bool:
    """Give a ZeRO-1/2 ``DeepSpeedZeroOptimizer`` the norm and clipping above; returns whether it applied."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload or optimizer.has_moe_layers:
        return False
    optimizer.scaled_global_norm = _scaled_global_norm(optimizer, optimizer.scaled_global_norm)
    optimizer.unscale_and_clip_grads = _unscale_and_clip(optimizer, optimizer.unscale_and_clip_grads)
    return True
