"""Uniformity regularisers on the student CLS embeddings: KoLeo and the KDE regulariser.

Both L2-normalise the embeddings and run in float32 with autocast off.

KoLeo (Sablayrolles et al. 2019; DINOv2): ``-mean_i log d_i`` with ``d_i`` the distance from x_i to
its nearest neighbour, smoothed as ``d_i = sqrt(||x_i - x_nn(i)||^2 + eps^2)``. The smoothing keeps
the loss (``<= -log eps``) and its gradient finite for duplicated embeddings, where DINOv2's
``-log(||x - y|| + eps)`` has an infinite-slope square root at 0. With fewer than two embeddings
there is no neighbour and the loss is 0 (DINOv2 returned ~18 or NaN there).

KDE (Virchow2, Midnight): the log of a von Mises-Fisher kernel density estimate at each sample,
``mean_i log( (1/n) sum_j exp(kappa (<x_i, x_j> - 1)) )``; the self term j = i is included, so the
loss lies in ``[-log n, 0]`` and is finite for any batch. Minimising it spreads the embeddings.

``distributed=True`` compares each local embedding with those of every rank (gradient-preserving
all-gather); the loss is then each rank's mean over its own samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from foundation.objectives import distributed as D


def _normalise_and_gather(x: torch.Tensor, distributed: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(local [n, d], candidates [n_all, d], offset of the local rows inside the candidates)``."""
    x = F.normalize(x.float(), dim=-1)
    if distributed and D.is_distributed():
        return x, D.all_gather_with_grad(x), D.rank() * x.shape[0]
    return x, x, 0


def koleo_loss(x: torch.Tensor, eps: float, distributed: bool = False) -> torch.Tensor:
    """KoLeo on ``x [n, d]`` (see the module docstring)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        local, candidates, offset = _normalise_and_gather(x, distributed)
        n = local.shape[0]
        if n == 0 or candidates.shape[0] < 2:
            return local.sum() * 0.0                                    # no neighbour; keeps the graph
        self_index = torch.arange(n, device=x.device) + offset
        with torch.no_grad():
            dots = local @ candidates.t()                               # [n, n_all]
            dots[torch.arange(n, device=x.device), self_index] = -math.inf
            nearest = dots.argmax(dim=1)
        dist2 = (local - candidates[nearest]).pow(2).sum(dim=-1)
        return -0.5 * torch.log(dist2 + eps * eps).mean()


def kde_loss(x: torch.Tensor, kappa: float, distributed: bool = False) -> torch.Tensor:
    """vMF-kernel KDE regulariser on ``x [n, d]`` (see the module docstring)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        local, candidates, _ = _normalise_and_gather(x, distributed)
        if local.shape[0] == 0:
            return local.sum() * 0.0
        log_density = torch.logsumexp(kappa * (local @ candidates.t() - 1.0), dim=1) - math.log(candidates.shape[0])
        return log_density.mean()
