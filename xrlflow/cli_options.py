"""Command-line flags generated from config dataclasses: each option is declared once, as a dataclass field
with `option(...)` metadata (its help, flag spelling, choices, how a value is read), and `add_options` /
`config_from` turn the fields into argparse flags and the parsed flags (or keyword arguments of the Python
API, same names) back into the config. Nested config dataclasses are walked: their fields are flags too.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from xrlflow.errors import BadInputError

# The exit codes of every command (documented in --help and the README's command-line section).
EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2  # also argparse's own exit for a bad flag
EXIT_NOT_VERIFIED = 3  # optimize: the result does not compute what the input computes; nothing written
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = (
    f"exit codes: {EXIT_OK} success, {EXIT_BAD_INPUT} bad input or usage, {EXIT_NOT_VERIFIED} the optimised model "
    f"failed verification (nothing written), {EXIT_INTERNAL_ERROR} internal error, {EXIT_INTERRUPTED} interrupted"
)


@dataclass(frozen=True)
class Option:
    help: str
    flag: str | None = None  # default: --field-name
    choices: tuple[str, ...] | None = None
    kind: Callable[[str], Any] | None = None  # argparse `type` for one value (int, float)
    read: Callable[[Any], Any] | None = None  # the flag's value (or the API's) -> the field's value
    metavar: str | None = None
    repeat: bool = False  # the flag may be given several times (a list of values)
    negate: bool = False  # a bool field set False by a store_true flag (--no-...)
    switch: bool = False  # a bool field set True by a store_true flag
    group: str | None = None  # fields of one mutually exclusive group (required when none has a default)


def option(help: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           **settings: Any) -> Any:
    """A dataclass field with its command-line option."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": Option(help, **settings)})


def _flag(f: dataclasses.Field, opt: Option) -> str:
    return opt.flag or "--" + f.name.replace("_", "-")


def dest(f: dataclasses.Field) -> str:
    """The argparse dest (and Python API keyword) of a field: its flag without dashes."""
    return _flag(f, f.metadata["option"]).lstrip("-").replace("-", "_")


def _options(config_cls: type) -> list[tuple[dataclasses.Field, Option | None]]:
    out = []
    for f in dataclasses.fields(config_cls):
        opt = f.metadata.get("option")
        nested = dataclasses.is_dataclass(f.default) and not isinstance(f.default, type)
        if opt is not None or nested:
            out.append((f, opt))
    return out


def _has_default(f: dataclasses.Field) -> bool:
    return f.default not in (dataclasses.MISSING, None) or f.default_factory is not dataclasses.MISSING


def add_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    groups: dict[str, Any] = {}
    options = _options(config_cls)
    defaulted = {opt.group for f, opt in options if opt is not None and opt.group is not None and _has_default(f)}
    for f, opt in options:
        if opt is None:
            add_options(parser, type(f.default))
            continue
        target: Any = parser
        if opt.group is not None:
            if opt.group not in groups:  # a group where one field has a default needs no flag of it
                groups[opt.group] = parser.add_mutually_exclusive_group(required=opt.group not in defaulted)
            target = groups[opt.group]
        help_text = opt.help
        shown = not (opt.negate or opt.switch or opt.repeat) and f.default not in (dataclasses.MISSING, None)
        if shown:  # the default is the field's, never written out a second time
            help_text += f" (default {f.default})"
        kwargs: dict[str, Any] = {"help": help_text, "dest": dest(f)}
        if opt.negate or opt.switch:
            kwargs["action"] = "store_true"
        else:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs["required"] = True
            if opt.repeat:
                kwargs["action"] = "append"
            elif opt.group is None and f.default is not dataclasses.MISSING and not opt.read:
                kwargs["default"] = f.default
            for key in ("choices", "metavar"):
                if getattr(opt, key) is not None:
                    kwargs[key] = getattr(opt, key)
            if opt.kind is not None:
                kwargs["type"] = opt.kind
        target.add_argument(_flag(f, opt), **kwargs)


def config_from(config_cls: type, values: Mapping[str, Any] | argparse.Namespace) -> Any:
    """The config from parsed flags or API keywords (by dest name); absent ones keep their defaults."""
    if isinstance(values, argparse.Namespace):
        values = vars(values)
    kwargs: dict[str, Any] = {}
    for f, opt in _options(config_cls):
        if opt is None:
            kwargs[f.name] = config_from(type(f.default), values)
            continue
        name = dest(f)
        if name not in values or (values[name] is None and not opt.read):
            continue
        kwargs[f.name] = field_value(opt, values[name])
    return config_cls(**kwargs)


def field_value(opt: Any, value: Any) -> Any:
    """A parsed flag's value as its dataclass field holds it (a negated flag flipped, a reader applied)."""
    if opt.negate:
        return not value
    if opt.read is not None:
        return opt.read(value)
    return value


def option_names(config_cls: type) -> set[str]:
    """Every dest name of a config (nested ones included)."""
    names: set[str] = set()
    for f, opt in _options(config_cls):
        names |= option_names(type(f.default)) if opt is None else {dest(f)}
    return names


def optional_value(parser: argparse.ArgumentParser, flag: str, bare: Any, metavar: str, help: str) -> None:
    """Let a generated flag be given without a value (`--policy` alone): it then reads `bare`."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    action.nargs, action.const, action.metavar, action.help = "?", bare, metavar, help


class OneLineParser(argparse.ArgumentParser):
    """argparse exits 2 with its usage on a bad flag; this keeps it to one line, as every xrlflow error."""

    def error(self, message: str) -> None:
        self.exit(EXIT_BAD_INPUT, f"xrlflow: error: {message}\n")


def run_handler(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command: its own exit code on success (0, or EXIT_NOT_VERIFIED), EXIT_BAD_INPUT with one line for
    bad input, EXIT_INTERNAL_ERROR with one line for anything else."""
    try:
        return int(handler(args) or EXIT_OK)
    except BadInputError as exc:
        print(f"xrlflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("xrlflow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # an internal error: one line, exit 1 (XRLFLOW_DEBUG=1 shows the traceback)
        if os.environ.get("XRLFLOW_DEBUG"):
            raise
        print(f"xrlflow: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


# ---- stderr messages: -q / -v ------------------------------------------------------------------------------------
LOGGER = "xrlflow"  # the commands' stderr messages: logging.getLogger("xrlflow").warning / .info / .debug


def add_verbosity_flags(parser: argparse.ArgumentParser, top_level: bool) -> None:
    """-q / -v on the top-level parser (counted from 0) and on each subcommand (SUPPRESS: the subcommand's
    count replaces the top-level one only when given there, so `xrlflow -v optimize` and `xrlflow optimize -v`
    both work)."""
    default = 0 if top_level else argparse.SUPPRESS
    parser.add_argument("-q", "--quiet", action="count", default=default,
                        help="fewer messages on stderr: -q only errors (no warnings, no progress bar)")
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more messages on stderr: -v what is being done, -vv debugging detail")


def verbosity_level(quiet: int, verbose: int) -> int:
    """The logging level of the stderr messages: warnings by default, errors with -q, info with -v, debug -vv."""
    return min(logging.CRITICAL, max(logging.DEBUG, logging.WARNING + 10 * (quiet - verbose)))


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "xrlflow: warning: " if record.levelno == logging.WARNING else "xrlflow: "
        return prefix + record.getMessage()


@contextmanager
def stderr_messages(level: int) -> Iterator[None]:
    """While a command runs: its log records at `level` or above go to stderr as one line each, and Python
    warnings (`warnings.warn` from xrlflow or a library) become such warning lines, so -q hides them too. The
    logger and `warnings.showwarning` are restored afterwards (main() may be called several times, as in tests)."""
    logger = logging.getLogger(LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    saved = logger.level, logger.propagate, warnings.showwarning

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        logger.warning(f"{category.__name__}: {message}")

    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    warnings.showwarning = show_warning
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        warnings.showwarning = saved[2]
