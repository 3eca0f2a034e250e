"""The `xrlflow` command line. Exit codes: 0 success, 2 bad input or usage, 1 internal error."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from xrlflow.cli_options import OneLineParser, run_handler

# Subcommands live next to what they drive; each module has `add_cli(subparsers)` which registers its
# parser(s) with `set_defaults(handler=...)`, the handler taking the parsed args and returning an exit code.
# None of them imports torch at import time; the zoo (PyTorch model definitions) is imported only for `zoo`.
COMMAND_MODULES = (
    "xrlflow.rules_cli",
    "xrlflow.measure_cli",
    "xrlflow.optimize_cli",
    "xrlflow.train",
)
ZOO_HELP = "the benchmark model zoo: list the models, export one to ONNX"


def _add_zoo(sub: argparse._SubParsersAction, command: str | None) -> None:
    if command != "zoo":  # listed in the help without importing torch
        sub.add_parser("zoo", help=ZOO_HELP, add_help=False)
        return
    from xrlflow.zoo import add_zoo_cli, run_zoo_cli

    add_zoo_cli(sub).set_defaults(handler=run_zoo_cli)


def build_parser(command: str | None = "zoo") -> argparse.ArgumentParser:
    """The parser; `command` is the subcommand about to be parsed (only `zoo` needs its full parser)."""
    parser = OneLineParser(prog="xrlflow", description="Reinforcement-learning graph superoptimizer for ONNX models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a subcommand not built in this checkout
            raise
        module.add_cli(sub)
    _add_zoo(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return run_handler(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
