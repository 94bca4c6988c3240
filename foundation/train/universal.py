"""Checkpoints that resume on another number of ranks (``foundation checkpoint universal``).

:func:`convert` turns one complete checkpoint (any ZeRO stage, N ranks) into a folder that any world size
can resume from::

    <out>/  zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt, mp_rank_00_model_states.pt   DeepSpeed universal format
            teacher/full.pt      the whole fp32 teacher (ZeRO-3 shards re-assembled)
            trainer/global.pt    loop state and the data position (the sampler's global position)
            COMPLETE             marker as for a training checkpoint, with ``universal: true``

The trainer resumes from it with ``train.resume=<out>`` (DeepSpeed's ``checkpoint.load_universal`` is set
from the marker). Per-rank RNG streams cannot be mapped onto another world size: a resumed run draws each
rank's randomness from ``meta.seed + rank`` again (the data augmentation is seeded per sample, not per rank).
"""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from foundation.fileio import atomic_write_text
from foundation.train.checkpoint import (
    COMPLETE,
    CheckpointError,
    _barrier,
    _list_files,
    _torch_load,
    atomic_save,
    load_engine_and_teacher,
    verify,
)

GLOBAL_STATE = "global.pt"


def _teacher_full(tag_dir: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    from foundation.eval.checkpoints import unpartition

    teacher_dir = tag_dir / "teacher"
    if not teacher_dir.is_dir():
        return None
    if (teacher_dir / "full.pt").is_file():
        return _torch_load(teacher_dir / "full.pt")
    shapes = meta.get("teacher_shapes")
    if not shapes:
        raise CheckpointError(f"{tag_dir / COMPLETE}: no teacher_shapes recorded; cannot re-assemble the shards")
    states = [_torch_load(teacher_dir / f"rank_{r:05d}.pt") for r in range(meta["world_size"])]
    out = {name: unpartition([s[f"shard.{name}"] for s in states], torch.Size(shape), name)
           for name, shape in shapes.items()}
    out.update({k.removeprefix("buffer."): v for k, v in states[0].items() if k.startswith("buffer.")})
    return out


def convert(tag_dir: Path, out: Path) -> Path:
    """Write the universal form of the checkpoint ``tag_dir`` into ``out`` (built in a temporary folder)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tag_dir, out = Path(tag_dir), Path(out)
    meta = verify(tag_dir)
    if meta.get("universal"):
        raise CheckpointError(f"{tag_dir}: already a universal checkpoint")
    if out.exists():
        raise CheckpointError(f"{out} exists; choose another --out")
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    teacher = _teacher_full(tag_dir, meta)
    if teacher is not None:
        atomic_save(teacher, tmp / "teacher" / "full.pt")
    rank0 = _torch_load(tag_dir / "trainer" / "rank_00000.pt")
    atomic_save({"trainer": rank0["trainer"], "data": rank0["data"], "iteration": rank0["iteration"],
                 "source_world_size": meta["world_size"]}, tmp / "trainer" / GLOBAL_STATE)
    new_meta = {**meta, "universal": True, "source": str(tag_dir.resolve()), "files": _list_files(tmp)}
    atomic_write_text(tmp / COMPLETE, json.dumps(new_meta, indent=1) + "\n")
    tmp.rename(out)
    return out


def load_universal(checkpointer: Any, tag_dir: Path) -> dict[str, Any]:
    """Restore engine (DeepSpeed ``load_universal``), teacher and loop/data state on this world size."""
    state = _torch_load(tag_dir / "trainer" / GLOBAL_STATE)
    teacher = _torch_load(tag_dir / "teacher" / "full.pt") if checkpointer.teacher is not None else None
    load_teacher = (lambda: checkpointer.teacher.load_full_state(teacher)) if teacher is not None else None
    load_engine_and_teacher(checkpointer.engine, tag_dir, "universal engine state", load_teacher,
                            tag_dir / "teacher" / "full.pt")
    _barrier()  # per-rank RNG is not carried across world sizes (see the module docstring)
    return {"trainer": state["trainer"], "data": state["data"], "iteration": state["iteration"]}
