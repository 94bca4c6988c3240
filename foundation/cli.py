"""The ``foundation`` command: one subcommand per job, each implemented in its own module.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported
only when their command runs, so ``foundation --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("foundation.demo", "write the embedded demo slides and their manifest"),
    "index": ("foundation.slides.index_cli", "detect tissue and build the tile index of a manifest"),
    "quickstart": ("foundation.quickstart", "the main job: demo data, index (and pretraining) in one go"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundation", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        # Arguments are added lazily (see main) so that only the chosen command's module is imported.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse the command name first, then let its module add its own arguments.
    names = [a for a in argv if not a.startswith("-")]
    if names and names[0] in COMMANDS:
        name = names[0]
        module = importlib.import_module(COMMANDS[name][0])
        sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        module.add_arguments(sub_action.choices[name])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
