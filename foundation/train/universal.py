"""Checkpoints that resume on another number of ranks (``foundation checkpoint universal``).

:func:`convert` turns one complete checkpoint (any ZeRO stage, N ranks) into a folder that any world size
can resume from::

    <out>/  zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt, *model_states.pt   DeepSpeed universal format
            buffers.pt           the student module's persistent buffers (DINO/iBOT centres...) by name
            teacher/full.pt      the whole fp32 teacher (ZeRO-3 shards re-assembled)
            trainer/global.pt    loop state and the data position (the sampler's global position)
            COMPLETE             marker as for a training checkpoint, with ``universal: true``
    <out>/../latest_universal    names ``<out>`` (as DeepSpeed's converter writes it; written after the rename)

The folder is built in ``.tmp_<out>/<out>`` beside it and renamed into place when complete. The trainer
resumes from it with ``train.resume=<out>`` (DeepSpeed's ``checkpoint.load_universal`` is set from the
marker). DeepSpeed loads only the parameters and optimizer state from a universal checkpoint, never the module
state, so :func:`load_universal` restores the buffers itself. Per-rank RNG streams cannot be mapped onto another
world size: a resumed run draws each rank's randomness from ``meta.seed + rank`` again (the data augmentation
is seeded per sample, not per rank).
"""

from __future__ import annotations

import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foundation.fileio import atomic_write_text
from foundation.train.checkpoint import (
    COMPLETE,
    CheckpointError,
    _barrier,
    _torch_load,
    atomic_save,
    load_engine_and_teacher,
    verify,
    write_marker,
)

GLOBAL_STATE = "global.pt"
BUFFERS = "buffers.pt"
LATEST_UNIVERSAL = "latest_universal"
#: DeepSpeed's module-state file of the first rank: ZeRO-0/1/2, then ZeRO-3
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s buffers that its ``state_dict`` holds (non-persistent ones are rebuilt, not saved), by name."""
    out = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def saved_buffers(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The module buffers DeepSpeed saved in ``tag_dir`` (its ``buffer_names`` out of ``module``), by name.

    DeepSpeed's model-state file holds its config objects, so it is read with ``weights_only=False``, as
    DeepSpeed and its converter read it."""
    path = next((tag_dir / n for n in MODEL_STATES if (tag_dir / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"{tag_dir}: none of DeepSpeed's module-state files {list(MODEL_STATES)}")
    try:
        states = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds of errors for a damaged file
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    module, names = states.get("module"), states.get("buffer_names")
    if module is None or names is None:
        raise CheckpointError(f"{path}: no 'module' state or no 'buffer_names' (not a DeepSpeed model-state file?)")
    missing = [n for n in names if n not in module]
    if missing:
        raise CheckpointError(f"{path}: buffers {missing[:5]} are listed in 'buffer_names' but not in 'module'")
    return {n: module[n].detach().clone() for n in names}


def restore_buffers(module: nn.Module, tag_dir: Path) -> None:
    """Copy the buffers kept in ``tag_dir`` into every persistent buffer of ``module``, in place; a buffer missing
    on either side or of another shape raises :class:`CheckpointError` naming it. A folder converted before
    ``buffers.pt`` existed still holds DeepSpeed's module-state files: the buffers are read from those."""
    source = tag_dir / BUFFERS
    saved = _torch_load(source) if source.is_file() else saved_buffers(tag_dir)
    live = persistent_buffers(module)
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or extra:
        raise CheckpointError(f"{source}: buffers of this model missing in the checkpoint {missing[:5]}, buffers "
                              f"in the checkpoint not in this model {extra[:5]}")
    for name, buf in live.items():
        if saved[name].shape != buf.shape:
            raise CheckpointError(f"{source}: buffer {name} is {list(saved[name].shape)} in the checkpoint, "
                                  f"{list(buf.shape)} here")
        with torch.no_grad():
            buf.copy_(saved[name])


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
    holder = out.with_name(f".tmp_{out.name}")  # DeepSpeed writes `latest_universal` beside its output: in here
    shutil.rmtree(holder, ignore_errors=True)
    tmp = holder / out.name
    tmp.mkdir(parents=True)
    ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    atomic_save(saved_buffers(tag_dir), tmp / BUFFERS)
    teacher = _teacher_full(tag_dir, meta)
    if teacher is not None:
        atomic_save(teacher, tmp / "teacher" / "full.pt")
    rank0 = _torch_load(tag_dir / "trainer" / "rank_00000.pt")
    atomic_save({"trainer": rank0["trainer"], "data": rank0["data"], "iteration": rank0["iteration"],
                 "source_world_size": meta["world_size"]}, tmp / "trainer" / GLOBAL_STATE)
    write_marker(tmp, {**{k: v for k, v in meta.items() if k != "files"}, "universal": True,
                       "source": str(tag_dir.resolve())})
    tmp.rename(out)
    atomic_write_text(out.parent / LATEST_UNIVERSAL, out.name)
    shutil.rmtree(holder, ignore_errors=True)
    return out


def load_universal(checkpointer: Any, tag_dir: Path) -> dict[str, Any]:
    """Restore engine (DeepSpeed ``load_universal``), module buffers, teacher and loop/data state on this world
    size."""
    state = _torch_load(tag_dir / "trainer" / GLOBAL_STATE)
    teacher = _torch_load(tag_dir / "teacher" / "full.pt") if checkpointer.teacher is not None else None
    load_teacher = (lambda: checkpointer.teacher.load_full_state(teacher)) if teacher is not None else None
    load_engine_and_teacher(checkpointer.engine, tag_dir, "universal engine state", load_teacher,
                            tag_dir / "teacher" / "full.pt")
    restore_buffers(checkpointer.engine.module, tag_dir)  # DeepSpeed skips the module state of a universal one
    _barrier()  # per-rank RNG is not carried across world sizes (see the module docstring)
    return {"trainer": state["trainer"], "data": state["data"], "iteration": state["iteration"]}
