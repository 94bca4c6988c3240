"""The global gradient norm of DeepSpeed's ZeRO-1/2 optimizer in one ``torch._foreach_norm`` call.

DeepSpeed computes the norm it clips with (``DeepSpeedZeroOptimizer.get_grad_norm_direct``) with a Python loop:
per parameter a cast to fp32, a norm and a device copy, about three kernel launches each. On a ViT-L (~450
parameter tensors) that is ~1,350 launches of host work per step during which the GPU waits (one H100: the step
was device-idle for a third of its time). :func:`use_foreach_grad_norm` replaces that method on one optimizer by
the same computation over all gradients at once: the same fp32 per-tensor norms, the same sum of squares, the same
reduction over ranks and the same NaN/inf masking. Anything it does not cover (another norm type, pipeline-
replicated parameters) goes to DeepSpeed's own method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

L2 = 2.0


def _foreach_l2(optimizer: Any, plain: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    def get_grad_norm_direct(gradients: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                             norm_type: float = L2) -> torch.Tensor:
        if float(norm_type) != L2 or any(getattr(p, PIPE_REPLICATED, False) for p in params):
            return plain(gradients, params, norm_type)
        # the selection DeepSpeed makes: no alignment padding; model-parallel copies counted once
        pairs = zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params, strict=False)
        grads = [g.detach() for g, p in pairs if is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0]
        if grads:
            norms = torch._foreach_norm(grads, L2, dtype=get_norm_dtype())
            total = torch.stack(norms).to(optimizer.device).pow(L2).sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32, device=optimizer.device)
        ds_comm.all_reduce(total, op=ds_comm.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=ds_comm.ReduceOp.SUM)
        total = total.pow(1.0 / L2)
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    return get_grad_norm_direct


def use_foreach_grad_norm(optimizer: Any) -> bool:
    """Give a ZeRO-1/2 ``DeepSpeedZeroOptimizer`` the foreach gradient norm; returns whether it applied."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    optimizer.get_grad_norm_direct = _foreach_l2(optimizer, optimizer.get_grad_norm_direct)
    return True
