"""The `xrlflow` command line. Exit codes (`cli_options.EXIT_*`): 0 success, 2 bad input or usage, 3 the optimised
model failed verification, 1 internal error."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from xrlflow.cli_options import (
    EXIT_CODES_HELP, OneLineParser, add_verbosity_flags, run_handler, stderr_messages, verbosity_level,
)
from xrlflow.version import __version__

# Subcommands live next to what they drive; each module has `add_cli(subparsers)` which registers its
# parser(s) with `set_defaults(handler=...)`, the handler taking the parsed args and returning an exit code.
# These import no torch; the commands below them do (PyTorch models, the policy) and are imported only when
# they are the command being run (the help lists them all).
COMMAND_MODULES = (
    "xrlflow.rules_cli",
    "xrlflow.measure_cli",
    "xrlflow.optimize_cli",
)
TORCH_COMMANDS = {
    "train": ("xrlflow.train", "train a rewrite policy (MaskablePPO, GNN) on zoo models"),
    "zoo": ("xrlflow.zoo", "the benchmark model zoo: list the models, export one to ONNX"),
}


def _add_torch_command(sub: argparse._SubParsersAction, name: str, command: str | None) -> None:
    module_name, help_text = TORCH_COMMANDS[name]
    if command != name:
        sub.add_parser(name, help=help_text, add_help=False)
        return
    module = importlib.import_module(module_name)
    if name == "zoo":
        module.add_zoo_cli(sub).set_defaults(handler=module.run_zoo_cli)
    else:
        module.add_cli(sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command` is the subcommand about to be parsed (a torch command gets its full parser only
    then)."""
    parser = OneLineParser(prog="xrlflow", description="Reinforcement-learning graph superoptimizer for ONNX models",
                           epilog=EXIT_CODES_HELP)
    parser.add_argument("--version", action="version", version=f"xrlflow {__version__}")
    add_verbosity_flags(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_cli(sub)
    for name in TORCH_COMMANDS:
        _add_torch_command(sub, name, command)
    for subparser in sub.choices.values():
        if not _has_option(subparser, "-v"):  # an alias lists its parser twice
            add_verbosity_flags(subparser, top_level=False)
    return parser


def _has_option(parser: argparse.ArgumentParser, flag: str) -> bool:
    return any(flag in action.option_strings for action in parser._actions)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    with stderr_messages(verbosity_level(args.quiet, args.verbose)):
        return run_handler(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
