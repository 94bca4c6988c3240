"""Self-distillation losses shared by DINO, iBOT and MAE+iBOT, and the two teacher-centring methods.

Notation: K prototypes, B images per view, temperatures tau_s (student) and tau_t (teacher).
All maths runs in float32 whatever the autocast or parameter dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foundation.objectives import distributed as D


def cross_view_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                             student_temp: float) -> torch.Tensor:
    """DINO's CLS loss: mean over view pairs ``(v, u)``, ``v != u``, of ``mean_b -sum_k t[u,b,k] log s[v,b,k]``.

    Args:
        student_logits: ``[V, B, K]``; views ``0 .. G-1`` are the global crops, the rest local crops.
        teacher_probs: ``[G, B, K]`` teacher distributions of the G global crops.
        student_temp: tau_s; ``s = softmax(student_logits / tau_s)``.

    A student view is never compared with the teacher's view of the same crop (``v == u``).
    """
    V, B, _ = student_logits.shape
    G = teacher_probs.shape[0]
    n_pairs = V * G - min(V, G)
    if n_pairs == 0:
        raise ValueError(f"no cross-view pairs with {V} student views and {G} teacher views: "
                         "DINO/iBOT need 2 global crops, or 1 global crop and local crops")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):  # the einsum must stay fp32
        log_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        ce = -torch.einsum("ubk,vbk->vu", teacher_probs.float(), log_s) / B   # [V, G]
        same_view = torch.eye(V, G, dtype=torch.bool, device=ce.device)
        return ce.masked_fill(same_view, 0.0).sum() / n_pairs


def masked_patch_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                               student_temp: float) -> torch.Tensor:
    """iBOT's patch loss, each image weighted equally: ``(1/I) sum_i (1/M_i) sum_{p masked in i} CE(t_p, s_p)``.

    Args:
        student_logits, teacher_probs: ``[M, K]`` for the masked patches, in ``x[masks]`` order.
        masks: ``[I, N]`` bool over all I images (images without masked patches count in I).
        student_temp: tau_s.
    """
    ce = -(teacher_probs.float() * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)  # [M]
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()                                    # [I]
    weights = per_image[:, None].expand_as(masks)[masks]                                       # [M]
    return (ce * weights).sum() / max(masks.shape[0], 1)


def _global_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` over ``dim`` of the tensor concatenated over ranks along ``dim`` (keepdim)."""
    peak = D.all_reduce_max(x.amax(dim=dim, keepdim=True) if x.shape[dim] else
                            x.new_full((*x.shape[:dim], 1, *x.shape[dim + 1:]), -torch.inf))
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return peak + torch.log(D.all_reduce_sum(torch.exp(x - peak).sum(dim=dim, keepdim=True)))


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, iterations: int) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV, DINOv2), correct across ranks.

    ``Q = exp(logits / tau_t)`` is alternately scaled so that every prototype gets ``1/K`` of the
    mass (sums over samples all-reduced over ranks) and every sample ``1/n_total`` (n_total = samples
    on all ranks). Returns ``[n, K]``; each row is a distribution (sums to 1). Runs in the log domain,
    so no logit scale overflows or underflows (DINOv2's ``exp`` does for ``|logits| / tau_t`` > ~88).
    """
    log_q = teacher_logits.float() / teacher_temp                            # [n, K]
    n_total = D.all_reduce_sum(torch.tensor([float(log_q.shape[0])], device=log_q.device))
    log_n, log_k = torch.log(n_total.clamp(min=1.0)), math.log(log_q.shape[1])
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp(log_q, dim=0) - log_k              # each prototype: mass 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_n  # each sample: mass 1/n_total
    return torch.exp(log_q + log_n)


class CenterEMA(nn.Module):
    """DINO centring: ``softmax((t - c) / tau_t)``, ``c <- m c + (1 - m) mean(t)`` (mean over all ranks).

    The centre is a buffer, so it is saved and restored with the module state.
    """

    def __init__(self, dim: int, momentum: float) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"centre momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centred, sharpened teacher distributions ``[n, K]`` (with the centre before this batch)."""
        return F.softmax((teacher_logits.float() - self.center.float()) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """EMA step towards this batch's mean over all ranks; no change if no rank had a sample."""
        total = D.all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        count = D.all_reduce_sum(torch.tensor([float(teacher_logits.shape[0])], device=total.device))
        new = self.center.float() * self.momentum + total / count.clamp(min=1.0) * (1.0 - self.momentum)
        # torch.where instead of `if count > 0` avoids a host sync
        self.center.copy_(torch.where(count > 0, new, self.center.float()))
