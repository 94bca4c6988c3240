"""The ``foundation`` command: one subcommand per job, each implemented in its own module.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported
only when their command runs, so ``foundation --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("foundation.demo", "write the embedded demo slides and their manifest"),
    "index": ("foundation.slides.index_cli", "detect tissue and build the tile index of a manifest"),
    "checkpoint": ("foundation.checkpoint_cli", "`checkpoint universal CKPT`: a checkpoint to resume on M ranks"),
    "export": ("foundation.export_cli", "write a checkpoint's teacher (or student) backbone as timm weights"),
    "quickstart": ("foundation.quickstart", "the main job: demo data, index, pretraining and export in one go"),
    "train": ("foundation.train_cli", "pretrain (MAE / iBOT / ...) with DeepSpeed on an indexed slide set"),
    "embed": ("foundation.eval.embed_cli", "features of a tile folder or of sampled tiles of indexed slides"),
    "eval": ("foundation.eval.eval_cli", "kNN and linear probes on class-per-folder tiles, with baselines"),
    "eval-seg": ("foundation.eval.seg_cli", "Ki67 segmentation demonstrator: linear decoder on frozen patch tokens"),
    "bench": ("foundation.bench", "throughput: `bench data` (pipeline vs a DataLoader), `bench step` (our step vs "
                                  "plain PyTorch), `bench e2e` (the whole loop)"),
}

_left_process_group = False  # set when a command run by main() joined a process group and left it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundation", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # `deepspeed --module foundation CMD ...` puts --local_rank=N before CMD; the command receives it
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        # Each command's own arguments are added in main(), so only the chosen command's module is imported.
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def _command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"foundation {name}", description=help_text)
    module.add_arguments(parser)
    return parser, module


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # Intermixed parsing lets `key=value` overrides follow flags; argparse cannot do it with nested subcommands.
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        return parser.parse_args(argv)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.prefix != sys.base_prefix:  # in a venv: DeepSpeed's JIT ops built for it (see tests/run.sh)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    split = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    top = build_parser().parse_args(argv if split is None else argv[: split + 1])
    parser, module = _command_parser(top.command)
    args = _parse(parser, argv[split + 1 :])
    args.verbose = top.verbose
    if top.local_rank is not None and getattr(args, "local_rank", None) is None:
        args.local_rank = top.local_rank
    logging.basicConfig(
        level=logging.DEBUG if top.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    joined_before = _in_process_group()
    try:
        return int(module.run(args) or 0)
    finally:
        if not joined_before and _in_process_group():
            _leave_process_group()


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _leave_process_group() -> None:
    """Destroy the process group the command joined (NCCL warns when it is left to interpreter exit). Its threads
    may still outlive this: :func:`entry` then exits without finalization."""
    import torch.distributed as dist

    global _left_process_group
    dist.destroy_process_group()
    _left_process_group = True


def exit_without_finalization(status: int) -> NoReturn:
    """Flush the logs and standard streams, then end the process with ``status`` at once.

    For a process that joined a process group: ZeRO-3 parameters and DeepSpeed's groups keep the group's
    communication threads (and rank 0's store server) alive past ``destroy_process_group``; interpreter
    finalization tears them down in no set order, and now and then aborted a rank that had finished its work
    (SIGABRT, or "terminate called without an active exception").
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def entry(argv: list[str] | None = None) -> NoReturn:
    """The ``foundation`` program: :func:`main`, then exit with its status; a command that joined a process group
    exits without interpreter finalization (:func:`exit_without_finalization`). Everything the run writes is
    closed by then."""
    status = main(argv)
    if _left_process_group:
        exit_without_finalization(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
