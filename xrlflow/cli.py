"""The `xrlflow` command line. Exit codes: 0 success, 2 bad input or usage, 1 internal error."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from xrlflow.errors import BadInputError

# Subcommands live next to what they drive; each module has `add_cli(subparsers)` which registers its
# parser(s) with `set_defaults(handler=...)`, the handler taking the parsed args and returning an exit code.
COMMAND_MODULES = (
    "xrlflow.rules_cli",
    "xrlflow.measure_cli",
    "xrlflow.optimizer",
    "xrlflow.train",
)


def _add_zoo(sub: argparse._SubParsersAction) -> None:
    from xrlflow.zoo import add_zoo_cli, run_zoo_cli

    add_zoo_cli(sub).set_defaults(handler=run_zoo_cli)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 with usage; keep it to one line
        self.exit(2, f"xrlflow: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xrlflow", description="Reinforcement-learning graph superoptimizer for ONNX models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a subcommand not built in this checkout
            raise
        module.add_cli(sub)
    _add_zoo(sub)
    return parser


def run(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return int(handler(args) or 0)
    except BadInputError as exc:
        print(f"xrlflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xrlflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line, exit 1 (XRLFLOW_DEBUG=1 shows the traceback)
        import os

        if os.environ.get("XRLFLOW_DEBUG"):
            raise
        print(f"xrlflow: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
