"""`xrlflow optimize` on the command line: the flags are generated from `OptimizeConfig` (`cli_options`),
plus the files it writes (-o, --report, --plot, --external-data)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from xrlflow.cli_options import (
    LOGGER, EXIT_CODES_HELP, EXIT_NOT_VERIFIED, EXIT_OK, add_options, config_from, optional_value,
)
from xrlflow.errors import BadInputError

if TYPE_CHECKING:
    from xrlflow.optimizer import OptimizeConfig, PolicySearcher

log = logging.getLogger(LOGGER)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize", help="optimise an ONNX model (policy or search), verify it and write it",
        description="Rewrite an ONNX model for lower latency with a trained policy or a search baseline; "
        "the result is verified against the input on the CPU EP before anything is written.",
        epilog=EXIT_CODES_HELP,
    )
    add_optimize_arguments(p)
    p.set_defaults(handler=run_optimize)


def add_optimize_arguments(p: argparse.ArgumentParser) -> None:
    from xrlflow.optimizer import OptimizeConfig

    p.add_argument("model", help="input ONNX file")
    p.add_argument("-o", "--output", help="where to write the optimised ONNX file (default MODEL.opt.onnx, beside MODEL)")
    add_options(p, OptimizeConfig)
    optional_value(p, "--policy", "", "RUN", "a trained policy instead of the search: a checkpoint folder "
                   "(checkpoints/RUN) or its policy.zip, or a shipped policy's name; --policy alone (after MODEL) is "
                   "the shipped xrlflow-h200. Without --policy or --search: the greedy search")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--plot", help="write a latency-per-step chart here, in the format its extension names (.png, .svg, .pdf, ...)")
    p.add_argument("--external-data", action="store_true", help="write the weights to OUT.onnx.data")


def config_from_args(args: argparse.Namespace):
    from xrlflow.optimizer import OptimizeConfig

    config = config_from(OptimizeConfig, args)
    quiet = getattr(args, "quiet", 0) > 0
    return dataclasses.replace(config, progress=config.progress and sys.stderr.isatty() and not quiet)


def default_output(model: str | os.PathLike[str]) -> str:
    """MODEL.opt.onnx beside the input: `m.onnx` -> `m.opt.onnx`, `m` -> `m.opt.onnx` (never the input itself)."""
    path = Path(model)
    stem = path.name[: -len(".onnx")] if path.name.lower().endswith(".onnx") else path.name
    return str(path.with_name(f"{stem}.opt.onnx"))


def _same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that would overwrite the input or each other, or cannot be written:
    the folder must exist and be writable, and the chart's extension be one matplotlib writes."""
    from xrlflow.report import plot_format

    model = Path(args.model)
    targets = [(flag, t) for flag, t in (("-o", args.output), ("--report", args.report), ("--plot", args.plot)) if t]
    for i, (flag, target) in enumerate(targets):
        for other_flag, other in targets[:i]:
            if _same_file(target, other):
                raise BadInputError(f"{other_flag} and {flag} name the same file {target}")
        if _same_file(target, model):
            raise BadInputError(f"{flag} {target} is the input model; choose another path")
        if Path(target).is_dir():
            raise BadInputError(f"{flag} {target} is a folder; give a file path")
        folder = Path(target).expanduser().absolute().parent
        if not folder.is_dir():
            raise BadInputError(f"{flag} {target}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadInputError(f"{flag} {target}: the folder {folder} is not writable")
    if args.external_data and _same_file(f"{args.output}.data", model):
        raise BadInputError(f"-o {args.output}: its external data file would overwrite the input")
    if args.plot:
        plot_format(args.plot)


def resolve_policy_flag(args: argparse.Namespace) -> None:
    """--policy SPEC -> the checkpoint path (`shipped.resolve_policy`: the shipped policy when given alone, and
    `checkpoints/xrlflow-h200` found in the installed package outside the checkout)."""
    if args.policy is None:
        return
    from xrlflow.shipped import resolve_policy

    spec = args.policy
    args.policy = str(resolve_policy(spec))
    if args.policy != spec:
        log.info(f"--policy {spec or '(alone)'}: {args.policy}")


def _early_warnings(config) -> list[str]:
    """Warnings known before the optimisation starts (the report records them too)."""
    from xrlflow.shipped import device_mismatch

    mismatch = device_mismatch(config.policy, config.device) if config.policy is not None else None
    return [mismatch] if mismatch else []


def write_result(result, output: str | os.PathLike[str], external_data: bool) -> None:
    """Write the optimised model (atomically) and record it and its size on disk in the report."""
    from xrlflow.onnx_io import save_model

    from xrlflow.advice import SNIPPET_MODEL

    save_model(result.model, output, external_data=external_data)
    result.report["output"], result.report["written"] = str(output), True
    advice = result.report.get("advice")
    if advice and advice.get("snippet"):
        advice["snippet"] = advice["snippet"].replace(repr(SNIPPET_MODEL), repr(str(output)))
    files = [Path(output), Path(f"{output}.data")]
    result.report["size"]["output_bytes"] = sum(p.stat().st_size for p in files if p.is_file())


def run_optimize(args: argparse.Namespace) -> int:
    from xrlflow.onnx_io import check_model_file
    from xrlflow.optimizer import VerificationError, optimize
    from xrlflow.report import format_summary, latency_chart, plot_latency_history, write_json

    if args.output is None:
        args.output = default_output(args.model)
    check_model_file(args.model)
    check_output_paths(args)
    resolve_policy_flag(args)
    config = config_from_args(args)
    log.info(f"optimising {args.model} with the {config.method} on {config.device} (latency: {config.latency})")
    log.debug(f"{config}")
    early = _early_warnings(config)
    for warning in early:
        log.warning(warning)  # now: the search may take long
    try:
        result = optimize(args.model, config, policy_searcher=policy_searcher_for(config))
        for note in result.report.get("notes") or ():
            print(f"xrlflow: {note}", file=sys.stderr)
    except VerificationError as failure:
        report = failure.report
        report["command"] = _command_line()
        report["warnings"] = early + report["warnings"]
        if args.report:
            write_json(args.report, report)
        print(format_summary(report), file=sys.stderr)
        print(f"xrlflow: {failure}; nothing written to {args.output}", file=sys.stderr)
        return EXIT_NOT_VERIFIED
    report = result.report
    report["command"] = _command_line()
    found, report["warnings"] = report["warnings"], early + report["warnings"]
    write_result(result, args.output, args.external_data)
    if args.report:
        write_json(args.report, report)
    if args.plot:
        plot_latency_history(args.plot, latency_chart(report), title=f"{Path(args.model).name}: {report['method']}")
    print(format_summary(report))
    for warning in found:
        log.warning(warning)
    if result.unchanged:  # the never-slower guarantee: still exit 0, the output equals the input
        print(f"xrlflow: nothing measured faster than the input: {args.output} is the input unchanged")
    print(f"wrote {args.output}" + (f", report {args.report}" if args.report else "") + (f", chart {args.plot}" if args.plot else ""))
    return EXIT_OK


def policy_searcher_for(config: OptimizeConfig) -> PolicySearcher | None:
    """The agent's rollout search when `config` asks for a policy; imported only then (it loads torch)."""
    if config.policy is None:
        return None
    from xrlflow.agents.policy_search import search_with_policy

    return search_with_policy


def _command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in ["xrlflow", *sys.argv[1:]]) if sys.argv else "xrlflow optimize"
