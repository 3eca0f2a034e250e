"""The long run of the rewrite property test: many random rewrite sequences on random small graphs.

    python -m bench.property_long [--sequences 10000] [--max-length 6] [--start-seed 0]

Same generator and checks as tests/test_property_rewrites.py (tests/graphgen.py): every offered match applies,
both exports (fold_constants False/True) pass onnx's full checker and match the original in onnxruntime
(rtol 1e-4, atol 1e-4), and structural_hash survives renaming/reordering nodes. A failure is shrunk to its
shortest failing prefix. Writes bench/results/property_long.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

try:
    from tests.graphgen import check_sequence, minimal_failing_prefix, random_model
except ModuleNotFoundError:  # tests/ is a package of the repository, importable only from its root
    raise SystemExit("bench/property_long.py: run it from the repository root as `python -m bench.property_long`") from None
from xrlflow.rules import RULE_FINGERPRINT, default_engine, rule_names
from xrlflow.measure import device_name


@dataclass(frozen=True)
class LongRunConfig:
    sequences: int = 10_000
    max_length: int = 6
    start_seed: int = 0
    output: Path = ROOT / "bench" / "results" / "property_long.md"


@dataclass
class Failure:
    seed: int
    picks: list[int]
    rules: list[str]
    message: str




def picks_for(seed: int, max_length: int) -> list[int]:
    rng = np.random.default_rng([seed, 7])
    return [int(p) for p in rng.integers(0, 1 << 16, size=int(rng.integers(1, max_length + 1)))]


def run(config: LongRunConfig) -> tuple[int, list[Failure], Counter, Counter, Counter, float]:
    engine = default_engine()
    applied: Counter = Counter()
    offered: Counter = Counter()
    lengths: Counter = Counter()
    failures: list[Failure] = []
    start = time.perf_counter()
    for i in range(config.sequences):
        seed = config.start_seed + i
        model = random_model(seed)
        picks = picks_for(seed, config.max_length)
        outcome = check_sequence(engine, model, picks, seed)
        applied.update(m.rule for m in outcome.applied)
        offered.update(outcome.offered)
        lengths[len(outcome.applied)] += 1
        if outcome.failure is not None:
            shortest = minimal_failing_prefix(engine, model, picks, seed)
            failures.append(Failure(seed, picks[: len(shortest.applied)], [m.rule for m in shortest.applied], shortest.failure or ""))
            print(f"FAIL seed {seed}: {[m.rule for m in shortest.applied]}: {shortest.failure}", flush=True)
        if (i + 1) % 1000 == 0:
            print(f"{i + 1}/{config.sequences} sequences, {len(failures)} failures, {time.perf_counter() - start:.0f} s", flush=True)
    return config.sequences, failures, applied, offered, lengths, time.perf_counter() - start


def write_report(config: LongRunConfig, command: str, result) -> str:
    count, failures, applied, offered, lengths, seconds = result
    names = rule_names()
    lines = [
        "# Long property run: random rewrite sequences on random graphs",
        "",
        f"- machine: {device_name('cpu')}, {os.cpu_count()} logical CPUs (shared), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- rule set: {len(names)} rules, fingerprint {RULE_FINGERPRINT}",
        f"- sequences: {count} (seeds {config.start_seed}..{config.start_seed + count - 1}, up to {config.max_length} "
        f"steps each), {seconds:.0f} s ({1000 * seconds / max(count, 1):.1f} ms a sequence)",
        f"- steps applied: {sum(applied.values())}; sequence lengths reached: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(lengths.items())),
        f"- failures: {len(failures)}",
        "",
        "Checks per sequence: every offered match at every step applies without raising; the final graph exported "
        "with fold_constants False and True passes `onnx.checker.check_model(full_check=True)` and computes the "
        "original's outputs in onnxruntime CPU (rtol 1e-4, atol 1e-4); structural_hash of the reloaded export is "
        "unchanged after renaming and reordering its nodes and renaming intermediate values.",
        "",
    ]
    if failures:
        lines += ["## Failures (shortest failing prefix)", "", "| seed | picks | rules applied | failure |", "|---|---|---|---|"]
        for f in failures[:50]:
            lines.append(f"| {f.seed} | {f.picks} | {' -> '.join(f.rules)} | {f.message.replace('|', '/')} |")
        if len(failures) > 50:
            lines.append(f"| ... | | | {len(failures) - 50} more |")
        lines += [
            "",
            "Reproduce: `check_sequence(default_engine(), random_model(seed), picks, seed)` from tests/graphgen.py.",
            "",
        ]
    lines += ["## Rules exercised", "", "| rule | applied in sequences | offered (each applied once to check it) |", "|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {applied.get(name, 0)} | {offered.get(name, 0)} |")
    never = [n for n in names if not offered.get(n)]
    lines += ["", f"Never offered on these graphs: {', '.join(never) if never else 'none'}.", ""]
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text("\n".join(lines))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=LongRunConfig.sequences)
    parser.add_argument("--max-length", type=int, default=LongRunConfig.max_length)
    parser.add_argument("--start-seed", type=int, default=LongRunConfig.start_seed)
    parser.add_argument("--output", type=Path, default=LongRunConfig.output)
    args = parser.parse_args()
    if args.sequences < 1 or args.max_length < 1:
        parser.error("--sequences and --max-length must be positive")
    config = LongRunConfig(args.sequences, args.max_length, args.start_seed, args.output)
    command = "python -m bench.property_long " + " ".join(sys.argv[1:])
    result = run(config)
    print(write_report(config, command.strip(), result))
    return 1 if result[1] else 0


if __name__ == "__main__":
    raise SystemExit(main())
