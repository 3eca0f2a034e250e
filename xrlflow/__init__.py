"""xrlflow: a reinforcement-learning graph superoptimizer for ONNX models.

`xrlflow.optimize(model_or_path, ...)` is the Python API of `xrlflow optimize` (see `optimize` below).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xrlflow.version import __version__

if TYPE_CHECKING:
    import onnx

    from xrlflow.optimizer import OptimizeResult


def optimize(model_or_path: "str | Any | onnx.ModelProto", *, output: str | None = None, external_data: bool = False,
             **options: Any) -> "OptimizeResult":
    """Optimise an ONNX model (a path or a ModelProto). The keyword options are `xrlflow optimize`'s flags with
    `_` for `-` (search, the default "greedy"; policy, a checkpoint path or a shipped name, "" the shipped
    default, as `--policy` alone; device, latency, rollouts, steps, budget, alpha, seed, input_shape={name: dims},
    rules=[...], disable_rules=[...], inputs, rtol, atol, tolerance={output: (rtol, atol)}, no_shape_check,
    ort_fusions="auto"|"on"|"off", no_ort_fusions, float16, threads, cuda_graph, ab_repeats, no_upgrade).

    Returns an `OptimizeResult` with `.model` (the verified optimised ModelProto, or the input unchanged when
    nothing was measured faster in the deployment setting: `.unchanged`, `.report["guarantee"]`) and `.report`
    (the JSON report as a dict). With `output` the model is also written there (atomically; `external_data` puts the weights in
    OUTPUT.data). Raises `xrlflow.optimizer.VerificationError` when the result does not verify and
    `xrlflow.errors.BadInputError` for unusable input.
    """
    from xrlflow.cli_options import config_from, option_names
    from xrlflow.errors import BadInputError
    from xrlflow.optimize_cli import policy_searcher_for, write_result
    from xrlflow.optimizer import OptimizeConfig, optimize as run

    unknown = sorted(set(options) - option_names(OptimizeConfig))
    if unknown:
        raise BadInputError(f"unknown option(s) {', '.join(unknown)}; xrlflow.optimize takes {', '.join(sorted(option_names(OptimizeConfig)))}")
    if options.get("policy") is not None:  # a checkpoint path, a shipped name, or "" for the shipped default
        from xrlflow.shipped import resolve_policy

        options["policy"] = str(resolve_policy(options["policy"]))
    config = config_from(OptimizeConfig, {"no_progress": True, **options})
    result = run(model_or_path, config, policy_searcher=policy_searcher_for(config))
    if output is not None:
        write_result(result, output, external_data)
    return result
