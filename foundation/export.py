"""Export a :class:`~foundation.models.backbone.StainViT` as plain timm weights, plus its stain-token table.

``export_backbone(backbone, cfg.model, vocab, out_dir)`` writes (pass the teacher's backbone where
the objective has a teacher; gather ZeRO-3 shards first):

- ``model.safetensors``: a state dict with exactly the keys of timm's ``VisionTransformer`` built
  from ``config.json``. No ``mask_token`` (training only; timm would also mistake a state dict that
  has one for a DINOv2 checkpoint) and no ``stain_token.*``.
- ``config.json``: timm's Hub layout (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``) plus a ``foundation`` section (the MLP class, the stain-token mode and the
  folded stain).
- ``stain_tokens.safetensors``: ``stain_table [S, D]``, ``marker_table [M, D]`` (if markers are used)
  and the unfolded ``cls_token [1, 1, D]``; ``stain_vocabulary.json``: the ids of those rows.

**How the stain token enters the timm model.** One stain label is folded into the weights, so the
plain timm model computes exactly what our backbone computes for that label (``unknown`` unless
``stain=``/``marker=`` say otherwise):

- mode ``token``: the stain vector ``stain_table[s] + marker_table[m]`` becomes the **first register
  token** (``reg_tokens`` is one more than in training; the sequence is then identical:
  CLS, stain, registers, patches, with no position embedding on prefix tokens);
- mode ``add``: the stain vector is added to ``cls_token``;
- mode ``none``: nothing is folded; the weights are the backbone's.

:func:`set_stain` refolds another label into a loaded model. Load offline with strict key matching::

    arch, kwargs = timm_load_args(out_dir)   # architecture, model kwargs + pretrained_cfg_overlay
    model = timm.create_model(arch, pretrained=True, **kwargs)

which is ``timm.create_model(<architecture>, pretrained=True, pretrained_cfg_overlay=dict(
<pretrained_cfg>, file=<out>/model.safetensors), **<model_args>, mlp_layer=<foundation.class_args>)``.
The ``pretrained_cfg`` written here holds ``num_classes=0`` (a mismatch with the architecture's 1000
classes would make timm load non-strictly) and ``custom_load=False`` (some architectures' default
weights are JAX ``.npz`` files with their own loader). When the architecture's default MLP is
the one used (always for ``mlp``; for ``swiglu`` with the ``*_dinov2`` giant architecture),
``timm.create_model("local-dir:<out>", pretrained=True)`` works as well.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from foundation.models.backbone import StainViT, vit_kwargs
from stain.vocabulary import StainLabel, StainVocabulary

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STAIN_TOKENS_FILE = "stain_tokens.safetensors"
VOCABULARY_FILE = "stain_vocabulary.json"
FORMAT_VERSION = 1
#: model kwargs that are classes, written to config.json as dotted import paths
CLASS_ARGS = ("mlp_layer",)


def _dotted(cls: Any) -> str:
    """Import path of a class or of a timm ``functools.partial`` alias (``timm.layers.SwiGLUPacked``)."""
    for name in dir(timm.layers):
        if getattr(timm.layers, name) is cls:
            return f"timm.layers.{name}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def stain_vector(backbone: StainViT, stain_id: int, marker_id: int) -> torch.Tensor:
    """``[D]`` vector of one label: ``stain_table[s] + marker_table[m]`` (marker ignored without a table)."""
    table = backbone.stain_token
    ids = torch.tensor([stain_id], device=table.stain_table.weight.device)
    markers = torch.tensor([marker_id], device=ids.device)
    table.check_ids(ids, markers)
    return table(ids, markers)[0]


def timm_state_dict(backbone: StainViT, stain_id: int = 0, marker_id: int = 0) -> dict[str, torch.Tensor]:
    """The backbone's weights under timm's keys with the label ``(stain_id, marker_id)`` folded in."""
    state = {k: v.detach() for k, v in backbone.state_dict().items()
             if k != "mask_token" and not k.startswith("stain_token.")}
    if backbone.stain_mode != "none":
        with torch.no_grad():
            vec = stain_vector(backbone, stain_id, marker_id).view(1, 1, -1).to(state["cls_token"].dtype)
        if backbone.stain_mode == "token":
            regs = state.get("reg_token")
            state["reg_token"] = vec if regs is None else torch.cat([vec, regs], dim=1)
        else:
            state["cls_token"] = state["cls_token"] + vec
    return {k: v.cpu().contiguous().clone() for k, v in state.items()}


def exported_model_args(model_cfg: Mapping[str, Any], stain_mode: str) -> dict[str, Any]:
    """timm kwargs of the exported model (one more register in mode ``token``); classes stay classes."""
    kwargs = vit_kwargs(model_cfg)
    if stain_mode == "token":
        kwargs["reg_tokens"] += 1
    return kwargs


def _check_against_timm(arch: str, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Build the target timm model on the meta device and compare keys and shapes with ``state``."""
    with torch.device("meta"):
        reference = timm.create_model(arch, pretrained=False, **kwargs).state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong = sorted(k for k in set(reference) & set(state) if reference[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"exported weights do not fit timm {arch}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {wrong[:5]}")


def export_backbone(backbone: StainViT, model_cfg: Mapping[str, Any], vocab: StainVocabulary,
                    out_dir: str | Path, *, stain: str | None = None, marker: str | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Path:
    """Write the export described in the module docstring into ``out_dir``; returns ``out_dir``.

    ``stain`` / ``marker`` name the label folded into the timm weights (default ``unknown``);
    ``mean`` / ``std`` (the data normalisation) go into ``pretrained_cfg`` when given.
    """
    out = Path(out_dir)
    if backbone.stain_token is not None and (backbone.stain_token.num_stains != vocab.num_stains
                                             or backbone.stain_token.num_markers not in (0, vocab.num_markers)):
        raise ValueError(f"vocabulary has {vocab.num_stains} stains / {vocab.num_markers} markers but the backbone's "
                         f"tables have {backbone.stain_token.num_stains} / {backbone.stain_token.num_markers}")
    label = vocab.requested_label(stain, marker)
    stain_id, marker_id = label.stain_id, label.marker_id
    arch = str(model_cfg["arch"])
    kwargs = exported_model_args(model_cfg, backbone.stain_mode)
    state = timm_state_dict(backbone, stain_id, marker_id)
    _check_against_timm(arch, kwargs, state)

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    json_args = {k: v for k, v in kwargs.items() if k not in CLASS_ARGS}
    pretrained_cfg: dict[str, Any] = {
        "num_classes": 0, "input_size": [3, kwargs["img_size"], kwargs["img_size"]],
        "interpolation": "bicubic", "crop_pct": 1.0, "custom_load": False,
    }
    if mean is not None and std is not None:
        pretrained_cfg.update(mean=[float(m) for m in mean], std=[float(s) for s in std])
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": kwargs["embed_dim"],
        "global_pool": kwargs["global_pool"],
        "model_args": json_args,
        "pretrained_cfg": pretrained_cfg,
        "foundation": {
            "format_version": FORMAT_VERSION,
            "class_args": {k: _dotted(kwargs[k]) for k in CLASS_ARGS},
            "stain_token": {
                "mode": backbone.stain_mode,
                "folded_stain_id": stain_id,
                "folded_marker_id": marker_id,
                "folded_label": vocab.describe(StainLabel(stain_id, marker_id)),
                "training_reg_tokens": int(model_cfg["reg_tokens"]),
                "tables": STAIN_TOKENS_FILE if backbone.stain_mode != "none" else None,
                "vocabulary": VOCABULARY_FILE,
            },
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (out / VOCABULARY_FILE).write_text(json.dumps(vocab.to_dict(), indent=2))
    if backbone.stain_token is not None:
        tables = {"stain_table": backbone.stain_token.stain_table.weight,
                  "cls_token": backbone.cls_token}
        if backbone.stain_token.marker_table is not None:
            tables["marker_table"] = backbone.stain_token.marker_table.weight
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tables.items()}, str(out / STAIN_TOKENS_FILE))
    return out


def _read_config(out_dir: Path) -> dict[str, Any]:
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {out_dir}: not an export of foundation.export")
    config = json.loads(path.read_text())
    if "foundation" not in config:
        raise ValueError(f"{path} has no 'foundation' section: not written by foundation.export")
    return config


def timm_load_args(out_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """``(architecture, kwargs)`` for ``timm.create_model(arch, pretrained=True, **kwargs)`` (offline, strict)."""
    out = Path(out_dir)
    config = _read_config(out)
    kwargs = dict(config["model_args"])
    for key, dotted in config["foundation"]["class_args"].items():
        kwargs[key] = _resolve(dotted)
    kwargs["pretrained_cfg_overlay"] = {**config["pretrained_cfg"], "file": str(out / WEIGHTS_FILE)}
    return config["architecture"], kwargs


def load_exported(out_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model (eval mode) and its stain info: the config's ``stain_token`` section, the
    vocabulary (``vocabulary``) and the tables (``tables``: name -> tensor; empty with mode none)."""
    out = Path(out_dir)
    arch, kwargs = timm_load_args(out)
    model = timm.create_model(arch, pretrained=True, **kwargs).eval()
    info = dict(_read_config(out)["foundation"]["stain_token"])
    info["vocabulary"] = json.loads((out / VOCABULARY_FILE).read_text())
    info["tables"] = load_file(str(out / STAIN_TOKENS_FILE)) if info["tables"] else {}
    return model, info


@torch.no_grad()
def set_stain(model: nn.Module, info: Mapping[str, Any], stain_id: int, marker_id: int = 0) -> None:
    """Refold another label into a model from :func:`load_exported` (in place).

    Mode ``token`` rewrites the first register token; mode ``add`` sets ``cls_token`` to the stored
    unfolded CLS plus the new vector. Ids index ``info["vocabulary"]``.
    """
    mode, tables = info["mode"], info["tables"]
    if mode == "none":
        raise ValueError("this export has stain mode 'none': there is no stain token to set")
    n_stains = tables["stain_table"].shape[0]
    n_markers = tables["marker_table"].shape[0] if "marker_table" in tables else 1
    if not (0 <= stain_id < n_stains and 0 <= marker_id < n_markers):
        raise ValueError(f"stain id {stain_id} / marker id {marker_id} outside the tables ({n_stains} / {n_markers})")
    vec = tables["stain_table"][stain_id].clone()
    if "marker_table" in tables:
        vec = vec + tables["marker_table"][marker_id]
    if mode == "token":
        model.reg_token[0, 0].copy_(vec)
    else:
        model.cls_token.copy_(tables["cls_token"] + vec.view(1, 1, -1))
