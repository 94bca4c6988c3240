"""Every loss against a float64 reference written here from its definition (loops, numpy), plus edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from foundation.objectives.byol import byol_loss
from foundation.objectives.koleo import kde_loss, koleo_loss
from foundation.objectives.losses import (
    CenterEMA,
    cross_view_cross_entropy,
    masked_patch_cross_entropy,
    sinkhorn_knopp,
)
from foundation.objectives.mae import mae_loss, patchify, pixel_targets, random_masking, unpatchify
from foundation.objectives.simclr import nt_xent


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------ DINO / iBOT
def test_cross_view_cross_entropy():
    V, G, B, K, tau = 5, 2, 3, 7, 0.1
    s = rng().normal(size=(V, B, K))
    t = np.exp(rng(1).normal(size=(G, B, K)))
    t /= t.sum(-1, keepdims=True)
    terms = [-np.mean([np.sum(t[u, b] * log_softmax64(s[v, b] / tau)) for b in range(B)])
             for v in range(V) for u in range(G) if v != u]
    got = cross_view_cross_entropy(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), tau)
    assert got.item() == pytest.approx(np.mean(terms), rel=1e-5)
    assert len(terms) == V * G - G
    with pytest.raises(ValueError, match="no cross-view pairs"):
        cross_view_cross_entropy(torch.zeros(1, B, K), torch.zeros(1, B, K), tau)


def test_masked_patch_cross_entropy_weights_each_image():
    I, N, K, tau = 4, 6, 5, 0.1
    masks = np.zeros((I, N), dtype=bool)
    masks[0, [1, 2, 5]] = True
    masks[1, [0]] = True
    masks[3, :] = True                                                       # image 2: nothing masked
    M = masks.sum()
    s = rng().normal(size=(M, K))
    t = np.exp(rng(1).normal(size=(M, K)))
    t /= t.sum(-1, keepdims=True)
    total, row = 0.0, 0
    for i in range(I):
        n_i = masks[i].sum()
        for _ in range(n_i):
            total += -np.sum(t[row] * log_softmax64(s[row] / tau)) / n_i
            row += 1
    expected = total / I
    got = masked_patch_cross_entropy(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
                                     torch.tensor(masks), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    empty = masked_patch_cross_entropy(torch.zeros(0, K), torch.zeros(0, K), torch.zeros(I, N, dtype=torch.bool), tau)
    assert empty.item() == 0.0


def sinkhorn64(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """SwAV/DINOv2 Sinkhorn-Knopp, single process, float64."""
    q = np.exp(logits / temp).T                                              # [K, n]
    K, n = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= K
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    return (q * n).T


def sinkhorn64_log(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """The same iteration in the log domain (float64), valid where exp(logits / temp) overflows."""
    log_q = logits / temp
    n, K = log_q.shape
    for _ in range(iterations):
        log_q = log_q - logsumexp(log_q, axis=0, keepdims=True) - math.log(K)
        log_q = log_q - logsumexp(log_q, axis=1, keepdims=True) - math.log(n)
    return np.exp(log_q + math.log(n))


def test_sinkhorn_knopp_against_reference_and_marginals():
    logits = rng().uniform(-1, 1, size=(12, 8))
    got = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.1, 3).double().numpy()
    np.testing.assert_allclose(got, sinkhorn64(logits, 0.1, 3), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)              # each sample: a distribution
    converged = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.1, 200).double().numpy()
    np.testing.assert_allclose(converged.sum(axis=0), 12 / 8, atol=1e-4)     # each prototype: n / K
    np.testing.assert_allclose(converged.sum(axis=1), 1.0, atol=1e-6)


def test_sinkhorn_knopp_large_logits_and_empty():
    big = torch.tensor(rng().uniform(-1, 1, size=(6, 5)), dtype=torch.float32) * 50.0
    out = sinkhorn_knopp(big, 0.04, 3)                                       # exp(1250) would overflow
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.double().numpy(), sinkhorn64_log(big.double().numpy(), 0.04, 3), atol=1e-6)
    np.testing.assert_allclose(out.sum(1).double().numpy(), 1.0, atol=1e-6)
    assert sinkhorn_knopp(torch.zeros(0, 5), 0.04, 3).shape == (0, 5)


def test_center_ema():
    logits = rng().normal(size=(6, 4))
    center = CenterEMA(4, momentum=0.9)
    with torch.no_grad():
        center.center.copy_(torch.tensor(rng(1).normal(size=(1, 4))))
    c0 = center.center.double().numpy()
    probs = center.probs(torch.tensor(logits, dtype=torch.float32), 0.05).double().numpy()
    expected = np.exp(log_softmax64((logits - c0) / 0.05))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    center.update(torch.tensor(logits, dtype=torch.float32))
    np.testing.assert_allclose(center.center.double().numpy(), 0.9 * c0 + 0.1 * logits.mean(0, keepdims=True),
                               rtol=1e-6, atol=1e-7)
    before = center.center.clone()
    center.update(torch.zeros(0, 4))                                         # no sample: no change
    assert torch.equal(center.center, before)
    assert "center" in center.state_dict()


# ------------------------------------------------------------------------------------------ KoLeo / KDE
def koleo64(x: np.ndarray, eps: float) -> float:
    x = unit(x)
    n = len(x)
    out = []
    for i in range(n):
        d2 = [np.sum((x[i] - x[j]) ** 2) for j in range(n) if j != i]
        out.append(-math.log(math.sqrt(min(d2) + eps * eps)))
    return float(np.mean(out))


def test_koleo_against_reference():
    x = rng().normal(size=(7, 5))
    got = koleo_loss(torch.tensor(x, dtype=torch.float32), 1e-8)
    assert got.item() == pytest.approx(koleo64(x, 1e-8), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_koleo_tiny_batches(n):
    x = torch.tensor(rng(n).normal(size=(n, 5)), dtype=torch.float32, requires_grad=True)
    loss = koleo_loss(x, 1e-8)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    if n == 1:
        assert loss.item() == 0.0
    else:
        assert loss.item() == pytest.approx(koleo64(x.detach().double().numpy(), 1e-8), rel=1e-5)


def test_koleo_finite_on_duplicates():
    base = torch.tensor(rng().normal(size=(3, 5)), dtype=torch.float32)
    x = torch.cat([base, base[:1], base[:1] * 2.0]).requires_grad_(True)   # exact and scaled duplicates
    loss = koleo_loss(x, 1e-8)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() <= -math.log(1e-8) + 1e-3
    assert loss.item() == pytest.approx(koleo64(x.detach().double().numpy(), 1e-8), rel=1e-4)


def kde64(x: np.ndarray, kappa: float) -> float:
    x = unit(x)
    n = len(x)
    return float(np.mean([math.log(sum(math.exp(kappa * (x[i] @ x[j] - 1.0)) for j in range(n)) / n)
                          for i in range(n)]))


def test_kde_against_reference_and_tiny_batches():
    x = rng().normal(size=(6, 4))
    assert kde_loss(torch.tensor(x, dtype=torch.float32), 5.0).item() == pytest.approx(kde64(x, 5.0), rel=1e-5)
    one = torch.tensor(x[:1], dtype=torch.float32, requires_grad=True)
    loss = kde_loss(one, 5.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and torch.isfinite(one.grad).all()  # <x, x> = 1 up to fp32
    dup = torch.tensor(x[:1], dtype=torch.float32).repeat(3, 1).requires_grad_(True)
    loss = kde_loss(dup, 5.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and torch.isfinite(dup.grad).all()


# ------------------------------------------------------------------------------------------ SimCLR / BYOL
def nt_xent64(z: np.ndarray, tau: float) -> float:
    """Multi-positive NT-Xent by its definition: anchors (v, b); positives (u != v, b); others everything else."""
    V, B, _ = z.shape
    z = unit(z)
    views = [(v, b) for v in range(V) for b in range(B)]
    losses = []
    for v, b in views:
        sims = {(u, c): z[v, b] @ z[u, c] / tau for u, c in views if (u, c) != (v, b)}
        log_denominator = math.log(sum(math.exp(s) for s in sims.values()))
        positives = [sims[(u, b)] - log_denominator for u in range(V) if u != v]
        losses.append(-np.mean(positives))
    return float(np.mean(losses))


@pytest.mark.parametrize("views", [2, 3])
def test_nt_xent_against_reference(views):
    z = rng(views).normal(size=(views, 4, 6))
    got = nt_xent(torch.tensor(z, dtype=torch.float32), 0.2)
    assert got.item() == pytest.approx(nt_xent64(z, 0.2), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 views"):
        nt_xent(torch.zeros(1, 4, 6), 0.2)


def test_byol_loss_against_reference():
    V, G, B = 4, 2, 3
    p, z = rng().normal(size=(V, B, 5)), rng(1).normal(size=(G, B, 5))
    terms = [np.mean([2 - 2 * unit(p[v, b]) @ unit(z[u, b]) for b in range(B)])
             for v in range(V) for u in range(G) if v != u]
    got = byol_loss(torch.tensor(p, dtype=torch.float32), torch.tensor(z, dtype=torch.float32))
    assert got.item() == pytest.approx(np.mean(terms), rel=1e-5)


# ------------------------------------------------------------------------------------------ MAE
def test_patchify_layout_and_round_trip():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch (row 1, col 2) = index 1 * 3 + 2; pixels ordered (y, x, channel)
    expected = images[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 5], expected)
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)


def test_random_masking_bookkeeping():
    torch.manual_seed(0)
    B, N, ratio = 5, 16, 0.75
    ids_keep, mask, ids_restore = random_masking(B, N, ratio, torch.device("cpu"))
    K = int(N * (1 - ratio))
    assert ids_keep.shape == (B, K) and mask.shape == (B, N) and ids_restore.shape == (B, N)
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - K)))          # exactly N - K hidden per sample
    for b in range(B):
        assert torch.all(mask[b, ids_keep[b]] == 0)                          # the kept patches are the visible ones
        assert torch.equal(ids_restore[b, ids_keep[b]], torch.arange(K))     # kept patch i comes back from slot i
        hidden = torch.nonzero(mask[b]).flatten()
        assert torch.equal(ids_restore[b, hidden].sort().values, torch.arange(K, N))  # hidden ones from mask slots
    assert len({tuple(row.tolist()) for row in ids_keep}) > 1                # a different mask per sample


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_against_reference(norm_pix):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pred = torch.randn(2, 4, 48, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    total, count = 0.0, 0
    for b in range(2):
        for p in range(4):
            if mask[b, p]:
                r, c = divmod(p, 2)
                target = images[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    target = (target - target.mean()) / math.sqrt(target.var().item() + 1e-6)
                total += ((pred[b, p] - target) ** 2).mean().item()
                count += 1
    got = mae_loss(pred.float(), pixel_targets(images.float(), 4, norm_pix, 1e-6), mask.float())
    assert got.item() == pytest.approx(total / count, rel=1e-5)
