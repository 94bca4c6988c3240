"""Features of a tile set under one or several encoders, in one pass over the decoded tiles; feature files.

A feature file (``.npz`` or ``.safetensors``) holds ``features [N, D]`` float32, ``labels [N]`` int64 when the
tiles came with classes, extra per-tile arrays (slide sets: slide id, coordinates) and a JSON ``metadata``
entry: the paths, class names, encoder, pooling, stain label and normalisation. In safetensors files the
per-tile strings (paths, slide ids) live in the metadata, which safetensors keeps as strings.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

FORMATS = (".npz", ".safetensors")


class FeatureSource(Protocol):
    """What :func:`extract` runs: an encoder or a baseline (``features(uint8 images, pooling) -> [B, D]``)."""

    name: str

    def features(self, images: torch.Tensor, pooling: str, labels: torch.Tensor | None = None) -> torch.Tensor: ...


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"eval.device = {name!r} is not one of ['auto', 'cpu', 'cuda']")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("eval.device = cuda, but no CUDA device is available")
    return torch.device(name)


def loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int,
           device: torch.device) -> torch.utils.data.DataLoader:
    """In-order batches of uint8 tiles (workers decode; pinned memory on CUDA)."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"eval.embed.batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       pin_memory=device.type == "cuda", persistent_workers=False)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; nothing on the CPU (features stay exactly reproducible there)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract(sources: Mapping[str, FeatureSource], batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
            pooling: str, device: torch.device, bf16: bool = False) -> dict[str, np.ndarray]:
    """``{name: features [N, D] float32}`` for every source, each batch decoded once and shared.

    A batch is uint8 images, or ``(images, labels)`` with a stain label per tile (``[B, 2]``, see
    :meth:`foundation.eval.encoder.Encoder.tokens`).
    """
    out: dict[str, list[np.ndarray]] = {name: [] for name in sources}
    for batch in batches:
        images, labels = (batch, None) if isinstance(batch, torch.Tensor) else batch
        images = images.to(device, non_blocking=True)
        with autocast(device, bf16):
            for name, source in sources.items():
                out[name].append(source.features(images, pooling, labels).float().cpu().numpy())
    return {name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for name, parts in out.items()}


@dataclass
class Embeddings:
    """A feature file's content."""

    features: np.ndarray
    paths: list[str]
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.features)
        lengths = {"paths": len(self.paths), **{k: len(v) for k, v in self.arrays.items()}}
        if self.labels is not None:
            lengths["labels"] = len(self.labels)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"embeddings: {n} feature rows but {bad}")


def _check_format(path: Path) -> str:
    if path.suffix not in FORMATS:
        raise ValueError(f"feature file {path}: the name must end in one of {list(FORMATS)}")
    return path.suffix


def save_embeddings(path: str | Path, emb: Embeddings) -> Path:
    """Write ``emb`` as ``.npz`` or ``.safetensors`` (chosen by the file name)."""
    path = Path(path)
    kind = _check_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**emb.metadata, "class_names": list(emb.class_names), "paths": list(emb.paths)}
    numeric = {k: v for k, v in emb.arrays.items() if v.dtype.kind in "iufb"}
    text = {k: v.tolist() for k, v in emb.arrays.items() if k not in numeric}
    tensors = {"features": np.ascontiguousarray(emb.features, dtype=np.float32), **numeric}
    if emb.labels is not None:
        tensors["labels"] = np.asarray(emb.labels, dtype=np.int64)
    if kind == ".npz":
        text_arrays = {k: np.array(v, dtype=str) for k, v in {**text, "paths": emb.paths}.items()}
        meta.pop("paths")
        np.savez(path, **tensors, **text_arrays, metadata=np.array(json.dumps(meta)))
    else:
        meta["text_arrays"] = text
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                  metadata={"metadata": json.dumps(meta)})
    return path


def load_embeddings(path: str | Path) -> Embeddings:
    """Read a file written by :func:`save_embeddings`."""
    path = Path(path)
    kind = _check_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {path} does not exist")
    if kind == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("metadata")))
        paths = arrays.pop("paths").tolist()
    else:
        arrays = load_file(str(path))
        with safe_open(str(path), "np") as handle:
            meta = json.loads(handle.metadata()["metadata"])
        paths = meta.pop("paths")
        arrays.update({k: np.array(v) for k, v in meta.pop("text_arrays").items()})
    features = arrays.pop("features")
    labels = arrays.pop("labels", None)
    class_names = meta.pop("class_names")
    return Embeddings(features, paths, labels, class_names, arrays, meta)
