"""xrlflow: a reinforcement-learning graph superoptimizer for ONNX models.

`xrlflow.optimize(model_or_path, ...)` is the Python API of `xrlflow optimize` (see `optimize` below).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

__version__ = "0.1.0"

if TYPE_CHECKING:
    import onnx

    from xrlflow.optimizer import OptimizeResult


def optimize(
    model_or_path: "str | Any | onnx.ModelProto",
    *,
    output: str | None = None,
    search: str | None = "greedy",
    policy: str | None = None,
    device: str = "cpu",
    latency: str = "measured",
    rollouts: int = 4,
    steps: int = 50,
    budget: int = 100,
    alpha: float = 1.05,
    input_shape: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    rules: Sequence[str] | None = None,
    disable_rules: Sequence[str] | None = None,
    inputs: str | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    tolerance: Mapping[str, tuple[float, float]] | None = None,
    shape_check: bool = True,
    external_data: bool = False,
) -> "OptimizeResult":
    """Optimise an ONNX model (a path or a ModelProto); keyword arguments mirror `xrlflow optimize`'s flags.

    Returns an `OptimizeResult` with `.model` (the verified optimised ModelProto) and `.report` (the JSON report
    as a dict). With `output` the model is also written there (atomically; `external_data` puts the weights in
    OUTPUT.data). Raises `xrlflow.optimizer.VerificationError` when the result does not verify and
    `xrlflow.errors.BadInputError` for unusable input.
    """
    from pathlib import Path

    from xrlflow.onnx_io import save_model
    from xrlflow.optimizer import OptimizeConfig, optimize as run
    from xrlflow.verify import Tolerance

    config = OptimizeConfig(
        search=search, policy=policy, device=device, latency=latency, rollouts=rollouts, steps=steps, budget=budget,
        alpha=alpha, input_shapes={k: tuple(int(d) for d in v) for k, v in (input_shape or {}).items()}, seed=seed,
        rules=tuple(rules) if rules is not None else None,
        disable_rules=tuple(disable_rules) if disable_rules is not None else None,
        inputs=inputs, tolerance=Tolerance(rtol=rtol, atol=atol),
        output_tolerances={k: Tolerance(rtol=r, atol=a) for k, (r, a) in (tolerance or {}).items()},
        check_other_shapes=shape_check,
    )
    result = run(model_or_path, config)
    if output is not None:
        save_model(result.model, output, external_data=external_data)
        result.report["output"], result.report["written"] = str(output), True
        files = [Path(output), Path(f"{output}.data")]
        result.report["size"]["output_bytes"] = sum(p.stat().st_size for p in files if p.is_file())
    return result
