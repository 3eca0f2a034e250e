"""`xrlflow zoo list` and `xrlflow zoo export` (registering them imports no torch; running them does)."""

from __future__ import annotations

import argparse
import os

from xrlflow.errors import BadInputError


def add_zoo_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `zoo list` and `zoo export`; dispatch the parsed arguments to run_zoo_cli."""
    zoo = subparsers.add_parser("zoo", help="the benchmark model zoo: list the models, export one to ONNX")
    commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="{list,export}")
    list_parser = commands.add_parser("list", help="print the models: name, parameters, nodes (if cached), shape")
    list_parser.add_argument("--small", action="store_true", help="describe the small variants")
    export = commands.add_parser("export", help="export a model to an ONNX file (cached after the first time)")
    export.add_argument("name", help="model name, see `xrlflow zoo list`")
    export.add_argument("-o", "--output", required=True, help="ONNX file to write")
    export.add_argument("--small", action="store_true", help="the small variant (fewer layers/channels)")
    export.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    export.add_argument("--seq", type=int, default=None, help="sequence length, sequence models only")
    return zoo


def _format_count(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1_000_000 else f"{count / 1e3:.1f}K"


def format_model_table(small: bool = False, cache_dir: str | os.PathLike[str] | None = None) -> str:
    from xrlflow.zoo.export import cached_summary
    from xrlflow.zoo.registry import count_parameters, model_inputs, list_models, resolve_config

    rows = [("name", "params", "nodes", "input shape", "description")]
    for entry in list_models():
        config = resolve_config(entry.name, small)
        summary = cached_summary(config, cache_dir)
        shape = ", ".join(spec.shape_text() for spec in model_inputs(config))
        nodes = str(summary["nodes"]) if summary else "-"
        rows.append((entry.name, _format_count(count_parameters(config)), nodes, shape, entry.description))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_zoo_cli(args: argparse.Namespace) -> int:
    """Handle `zoo list` / `zoo export`; BadInputError propagates for the CLI to report (exit code 2)."""
    if args.zoo_command == "list":
        print(format_model_table(small=args.small))
        return 0
    if args.zoo_command == "export":
        from xrlflow.zoo.export import cached_summary, export_model_to_file
        from xrlflow.zoo.registry import resolve_config

        path = export_model_to_file(args.name, args.output, small=args.small, batch=args.batch, seq=args.seq)
        config = resolve_config(args.name, args.small, args.batch, args.seq)
        summary = cached_summary(config) or {}
        print(f"wrote {path} ({summary.get('nodes', '?')} nodes, {path.stat().st_size / 1e6:.1f} MB)")
        return 0
    raise BadInputError(f"unknown zoo command {args.zoo_command!r}")
