"""Stain augmentation: per-crop parameter sampling and the torch reference of the OD-space transform.

Every crop gets one ``(M, T)``: ``OD' = OD @ M + T`` (log -> matrix -> exp, see :mod:`stain.deconvolution`). Per
stain channel, concentrations become ``alpha * c + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)`` and
``beta ~ U(-shift_sigma, shift_sigma)`` (Tellez et al.; scikit-image units). The policy comes from the crop's stain
kind (``StainVocabulary.stain_kind``) through the config section ``data.augmentation.stain``; its basis is

* ``hed``: hematoxylin, eosin, DAB (H&E);
* ``hdab``: hematoxylin, DAB and a residual channel (IHC);
* ``none``: the identity.

The DAB channel takes its own ``dab_sigma`` / ``dab_shift_sigma`` when ``perturb_dab`` and is left exactly
unchanged otherwise.

The same ``(M, T)`` drives :func:`apply_stain_matrix` (torch) and :func:`stain.dali_ops.stain_augment` (DALI).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from stain.deconvolution import MAX_LEVEL, RGB_FLOOR, basis, stain_jitter_transform

STAIN_KINDS = ("he", "ihc", "special", "unknown")
POLICY_BASES = ("none", "hed", "hdab")
POLICY_KEYS = ("basis", "sigma", "shift_sigma", "perturb_dab", "dab_sigma", "dab_shift_sigma")
#: uniforms drawn per crop: apply?, 3 scales, 3 shifts (a fixed count keeps the stream independent of the policies)
STAIN_DRAWS_PER_CROP = 7


def _channel_sigmas(name: str, policy: Mapping[str, Any]) -> tuple[str, np.ndarray, np.ndarray]:
    """``(basis, scale sigmas [3], shift sigmas [3])`` of policy ``name``; raises naming a bad value."""
    for key in POLICY_KEYS:
        if key not in policy:
            raise ValueError(f"augmentation.stain.policies.{name}: missing key {key!r}")
    basis_name = str(policy["basis"])
    if basis_name not in POLICY_BASES:
        raise ValueError(f"augmentation.stain.policies.{name}.basis={basis_name!r}; choose one of {POLICY_BASES}")
    values = {key: float(policy[key]) for key in ("sigma", "shift_sigma", "dab_sigma", "dab_shift_sigma")}
    for key, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"augmentation.stain.policies.{name}.{key}={value} must lie in [0, 1)")
    if basis_name == "none":
        return basis_name, np.zeros(3), np.zeros(3)
    scale, shift = np.full(3, values["sigma"]), np.full(3, values["shift_sigma"])
    dab = basis(basis_name).channels.index("dab")
    on = bool(policy["perturb_dab"])
    scale[dab] = values["dab_sigma"] if on else 0.0
    shift[dab] = values["dab_shift_sigma"] if on else 0.0
    return basis_name, scale, shift


class StainPolicy:
    """The ``data.augmentation.stain`` section, validated once for the stain kinds in ``kinds``.

    Holds per kind the basis and the per-channel sigmas, so that turning uniforms into transforms
    (:meth:`transforms`) repeats no validation and no dict lookups.
    """

    def __init__(self, cfg: Mapping[str, Any], kinds: Sequence[str]) -> None:
        self.p = float(cfg["p"])
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augmentation.stain.p={self.p} must lie in [0, 1]")
        self.kinds = list(dict.fromkeys(kinds))
        policies = [self._policy(kind, cfg) for kind in self.kinds]
        self.bases = np.array([policy[0] for policy in policies], dtype=object)  # [K]
        self.scale = np.array([policy[1] for policy in policies]).reshape(-1, 3)  # [K, 3]
        self.shift = np.array([policy[2] for policy in policies]).reshape(-1, 3)  # [K, 3]

    @staticmethod
    def _policy(kind: str, cfg: Mapping[str, Any]) -> tuple[str, np.ndarray, np.ndarray]:
        if kind not in cfg["kinds"]:
            raise KeyError(f"stain kind {kind!r} has no policy under augmentation.stain.kinds "
                           f"(kinds: {sorted(cfg['kinds'])})")
        name = str(cfg["kinds"][kind])
        if name not in cfg["policies"]:
            raise KeyError(f"augmentation.stain.kinds.{kind}={name!r} is not under augmentation.stain.policies "
                           f"({sorted(cfg['policies'])})")
        return _channel_sigmas(name, cfg["policies"][name])

    def ids(self, kinds: Sequence[str]) -> np.ndarray:
        """Row of each kind in this policy's tables (``[N]`` int)."""
        return np.array([self.kinds.index(kind) for kind in kinds], dtype=np.int64)

    def transforms(self, kind_ids: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(M [N,3,3], T [N,3])`` float32 of ``N`` crops from their kinds (:meth:`ids`) and uniforms ``[N, 7]``.

        Element by element, so ``N`` crops of many samples at once give exactly their one-sample results.
        """
        n = len(kind_ids)
        m = np.tile(np.eye(3), (n, 1, 1))
        t = np.zeros((n, 3))
        applied = u[:, 0] < self.p
        bases = self.bases[kind_ids]
        alpha = 1.0 + self.scale[kind_ids] * (2.0 * u[:, 1:4] - 1.0)
        beta = self.shift[kind_ids] * (2.0 * u[:, 4:7] - 1.0)
        for name in ("hed", "hdab"):
            rows = applied & (bases == name)
            if rows.any():
                m[rows], t[rows] = stain_jitter_transform(name, alpha[rows], beta[rows])
        return np.ascontiguousarray(m, dtype=np.float32), np.ascontiguousarray(t, dtype=np.float32)


def sample_stain_params(kinds: Sequence[str], rng: np.random.Generator,
                        cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one stain transform per crop: ``(M [N,3,3], T [N,3])`` float32, C-contiguous.

    ``kinds`` holds the stain kind of each crop; ``cfg`` is the ``data.augmentation.stain`` section. Exactly
    ``7 * N`` uniforms are drawn from ``rng`` whatever the policies, so the stream stays aligned across configs.
    """
    policy = StainPolicy(cfg, kinds)
    u = rng.random((len(kinds), STAIN_DRAWS_PER_CROP))
    return policy.transforms(policy.ids(kinds), u)


def apply_stain_matrix(images: torch.Tensor, m: torch.Tensor | np.ndarray,
                       t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Torch reference: ``[N,H,W,3]`` RGB levels (uint8 or float in ``[0, 255]``) -> float levels in ``[0, 255]``.

    Computes ``255 * exp(-(OD @ M + T))`` per sample, clipped to 255. Float64 input is computed in float64,
    anything else in float32.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got {tuple(images.shape)}")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    m = torch.as_tensor(m, dtype=dtype, device=images.device)
    t = torch.as_tensor(t, dtype=dtype, device=images.device)
    n = images.shape[0]
    if m.shape != (n, 3, 3) or t.shape != (n, 3):
        raise ValueError(f"M must be [{n}, 3, 3] and T [{n}, 3], got {tuple(m.shape)} and {tuple(t.shape)}")
    od = -torch.log(torch.clamp(images.to(dtype) / MAX_LEVEL, min=RGB_FLOOR))
    od = torch.einsum("nhwc,ncd->nhwd", od, m) + t[:, None, None, :]
    return torch.clamp(MAX_LEVEL * torch.exp(-od), max=MAX_LEVEL)
