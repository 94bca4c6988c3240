"""``WEIGHTS`` of the eval commands -> an :class:`~foundation.eval.encoder.Encoder`.

* an export folder (``config.json`` of :mod:`foundation.export`): the timm model, its normalisation from
  ``pretrained_cfg`` (the data config's otherwise), with the label it was exported with or, when one is asked
  for, that label refolded with :func:`~foundation.export.set_stain`;
* a training run, its ``checkpoints`` folder or a ``step_XXXXXXXX`` folder: the teacher backbone (the student
  with ``student=True``), built from the run's ``config.yaml`` (the command's config when the run has none);
  normalisation and input size from that config's ``data.crops``;
* ``random:`` / ``random:<model>``: a random init of the command's ``model`` or of ``configs/model/<model>.yaml``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from foundation.config import ConfigError, load_config, to_dict
from foundation.eval import checkpoints
from foundation.eval.encoder import Encoder, StainEncoder, TimmEncoder, seeded
from foundation.export import CONFIG_FILE, load_exported, set_stain, timm_load_args
from foundation.models.backbone import build_backbone
from foundation.objectives import build_objective
from stain.vocabulary import UNKNOWN, StainVocabulary

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


def stain_args(vocab: StainVocabulary, stain: str | None, marker: str | None) -> dict[str, Any]:
    """:class:`StainEncoder` keywords of a requested label (``None`` and ``unknown`` are id 0; a marker alone
    means IHC)."""
    label = vocab.requested_label(stain, marker)
    return {"stain_id": label.stain_id, "marker_id": label.marker_id, "label": vocab.describe(label)}


def _random(spec: str, cfg: DictConfig, stain: str | None, marker: str | None) -> Encoder:
    name = spec[len(RANDOM_PREFIX):]
    if name:
        cfg = load_config(cfg.meta.preset, [*cfg.meta.overrides, f"model={name}"])
    vocab = StainVocabulary.from_config(to_dict(cfg.stain))
    model_cfg = to_dict(cfg.model)
    backbone = seeded(int(cfg.eval.seed), lambda: build_backbone(model_cfg, vocab.num_stains, vocab.num_markers,
                                                                 mask_token=False))
    return StainEncoder(backbone, f"random init ({model_cfg['arch']}, {name or 'config model'})",
                        cfg.data.crops.mean, cfg.data.crops.std, int(cfg.data.crops.global_size), model_cfg,
                        **stain_args(vocab, stain, marker))


def _checkpoint(path: Path, cfg: DictConfig, stain: str | None, marker: str | None, student: bool) -> Encoder:
    tag = checkpoints.tag_dir(path)
    config_path = checkpoints.run_config_path(tag)
    if config_path is not None:
        run_cfg: DictConfig = OmegaConf.load(config_path)  # type: ignore[assignment]
    else:
        log.warning("%s: the run wrote no %s; building the model from this command's config", tag,
                    checkpoints.RUN_CONFIG)
        run_cfg = cfg
    try:
        objective = build_objective(run_cfg)
    except (ConfigError, KeyError, ValueError) as err:
        raise ConfigError(f"cannot build the objective of {config_path or 'the command config'}: {err}") from err
    backbone, origin = checkpoints.load_backbone(tag, objective, student)
    vocab = StainVocabulary.from_config(to_dict(run_cfg.get("stain") or {}))
    crops = run_cfg.data.crops
    return StainEncoder(backbone, origin, crops.mean, crops.std, int(crops.global_size), to_dict(run_cfg.model),
                        **stain_args(vocab, stain, marker))


def _export_vocab_id(entries: list[dict[str, Any]], name: str, what: str, path: Path) -> int:
    for entry in entries:
        if entry["name"] == name:
            return int(entry["id"])
    raise ValueError(f"{path}: the export's vocabulary has no {what} {name!r} ({[e['name'] for e in entries]})")


def _export(path: Path, cfg: DictConfig, stain: str | None, marker: str | None) -> Encoder:
    model, info = load_exported(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    pretrained = config.get("pretrained_cfg", {})
    mean, std = pretrained.get("mean"), pretrained.get("std")
    if mean is None or std is None:
        log.warning("%s: the export names no normalisation; using data.crops mean/std of the config", path)
        mean, std = list(cfg.data.crops.mean), list(cfg.data.crops.std)
    vocab = StainVocabulary.from_config(to_dict(cfg.stain))
    requested = vocab.requested_label(stain, marker)
    refold = _refolder(model, info, vocab, path) if info["mode"] != "none" else None
    if refold is None:
        label = "none (no stain token)"
        if requested.stain_id or requested.marker_id:
            log.info("%s has stain mode 'none': the stain label is ignored", path)
    elif stain is None and marker is None:
        label = str(info.get("folded_label", UNKNOWN))  # the label `foundation export --stain` folded in
    else:
        refold(requested.stain_id, requested.marker_id)
        label = vocab.describe(requested)
    arch, kwargs = timm_load_args(path)
    kwargs.pop("pretrained_cfg_overlay")
    return TimmEncoder(model, f"export {path}", mean, std, int(pretrained["input_size"][-1]), arch, kwargs, label,
                       refold)


def _refolder(model: torch.nn.Module, info: dict[str, Any], vocab: StainVocabulary,
              path: Path) -> Callable[[int, int], None]:
    """Fold a label given in ``vocab`` ids into an export, through the export's own vocabulary (by name)."""
    exported = info["vocabulary"]

    def refold(stain_id: int, marker_id: int) -> None:
        set_stain(model, info, _export_vocab_id(exported["stains"], vocab.stain_name(stain_id), "stain", path),
                  _export_vocab_id(exported["markers"], vocab.marker_name(marker_id), "marker", path))

    return refold


def load_encoder(spec: str, cfg: DictConfig, stain: str | None = None, marker: str | None = None,
                 student: bool = False) -> Encoder:
    """The encoder ``spec`` names (see the module docstring), on the CPU, in eval mode."""
    if spec.startswith(RANDOM_PREFIX):
        return _random(spec, cfg, stain, marker)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"weights {spec!r}: no such file or folder (nor random:<model>)")
    if (path / CONFIG_FILE).is_file():
        if student:
            raise ValueError(f"{path} is an export (one backbone): --student applies to training checkpoints")
        return _export(path, cfg, stain, marker)
    if checkpoints.is_checkpoint_path(path):
        return _checkpoint(path, cfg, stain, marker, student)
    raise ValueError(f"weights {spec!r}: neither an export folder (no {CONFIG_FILE}) nor a training run / "
                     "checkpoints / step_XXXXXXXX folder (no checkpoints/latest)")
