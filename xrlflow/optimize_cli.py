"""`xrlflow optimize` on the command line: the flags are generated from `OptimizeConfig` (`cli_options`),
plus the files it writes (-o, --report, --plot, --external-data)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from xrlflow.cli_options import add_options, config_from
from xrlflow.errors import BadInputError


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize", help="optimise an ONNX model (policy or search), verify it and write it",
        description="Rewrite an ONNX model for lower latency with a trained policy or a search baseline; "
        "the result is verified against the input on the CPU EP before anything is written.",
    )
    add_optimize_arguments(p)
    p.set_defaults(handler=run_optimize)


def add_optimize_arguments(p: argparse.ArgumentParser) -> None:
    from xrlflow.optimizer import OptimizeConfig

    p.add_argument("model", help="input ONNX file")
    p.add_argument("-o", "--output", required=True, help="where to write the optimised ONNX file")
    add_options(p, OptimizeConfig)
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--plot", help="write a latency-per-step chart here (PNG)")
    p.add_argument("--external-data", action="store_true", help="write the weights to OUT.onnx.data")


def config_from_args(args: argparse.Namespace):
    from xrlflow.optimizer import OptimizeConfig

    config = config_from(OptimizeConfig, args)
    return dataclasses.replace(config, progress=config.progress and sys.stderr.isatty())


def _same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that would overwrite the input or cannot be files."""
    model = Path(args.model)
    for flag, target in (("-o", args.output), ("--report", args.report), ("--plot", args.plot)):
        if target is None:
            continue
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
    if args.policy is not None and not Path(args.policy).exists():
        raise BadInputError(f"--policy {args.policy}: no such checkpoint")


def write_result(result, output: str | os.PathLike[str], external_data: bool) -> None:
    """Write the optimised model (atomically) and record it and its size on disk in the report."""
    from xrlflow.onnx_io import save_model

    from xrlflow.optimizer import SNIPPET_MODEL

    save_model(result.model, output, external_data=external_data)
    result.report["output"], result.report["written"] = str(output), True
    advice = result.report.get("advice")
    if advice and advice.get("snippet"):
        advice["snippet"] = advice["snippet"].replace(repr(SNIPPET_MODEL), repr(str(output)))
    files = [Path(output), Path(f"{output}.data")]
    result.report["size"]["output_bytes"] = sum(p.stat().st_size for p in files if p.is_file())


def run_optimize(args: argparse.Namespace) -> int:
    from xrlflow.optimizer import VerificationError, optimize
    from xrlflow.report import format_summary, plot_latency_history, plot_series, write_json

    check_output_paths(args)
    config = config_from_args(args)
    try:
        result = optimize(args.model, config)
        for note in result.report.get("notes") or ():
            print(f"xrlflow: {note}", file=sys.stderr)
    except VerificationError as failure:
        report = failure.report
        report["command"] = _command_line()
        if args.report:
            write_json(args.report, report)
        print(format_summary(report), file=sys.stderr)
        print(f"xrlflow: {failure}; nothing written to {args.output}", file=sys.stderr)
        return 1
    report = result.report
    report["command"] = _command_line()
    write_result(result, args.output, args.external_data)
    if args.report:
        write_json(args.report, report)
    if args.plot:
        plot_latency_history(
            args.plot, plot_series(report), baseline_ms=report["latency"]["before"]["ms"],
            title=f"{Path(args.model).name}: {report['method']}",
        )
    print(format_summary(report))
    for warning in report["warnings"]:
        print(f"xrlflow: warning: {warning}", file=sys.stderr)
    if result.unchanged:  # the never-slower guarantee: still exit 0, the output equals the input
        print(f"xrlflow: nothing measured faster than the input: {args.output} is the input unchanged")
    print(f"wrote {args.output}" + (f", report {args.report}" if args.report else "") + (f", chart {args.plot}" if args.plot else ""))
    return 0


def _command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in ["xrlflow", *sys.argv[1:]]) if sys.argv else "xrlflow optimize"
