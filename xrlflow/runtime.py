"""onnxruntime, imported through here by every part of xrlflow that runs a model.

xrlflow depends on neither onnxruntime nor onnxruntime-gpu: both install the same `onnxruntime` module, so
a hard dependency on one would put the other's build beside it. The `cpu` and `gpu` extras pick one; with
neither installed, the first command that runs a model says so in one line (exit 2), not with a traceback.
"""

from __future__ import annotations

from importlib import metadata

from xrlflow.errors import BadInputError

# Distributions that provide the `onnxruntime` module (onnxruntime's own builds for other execution providers).
ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
    "onnxruntime-silicon", "ort-nightly", "ort-nightly-gpu",
)
INSTALL_HINT = "pip install 'xrlflow[cpu]', or 'xrlflow[gpu]' for CUDA (one of the two, never both)"


class OnnxRuntimeMissingError(BadInputError):
    """No usable onnxruntime build is installed; the message says which extra to install."""


def installed_onnxruntime_distributions() -> tuple[str, ...]:
    """The installed distributions among ONNXRUNTIME_DISTRIBUTIONS, e.g. ('onnxruntime', 'onnxruntime-gpu')."""
    found = []
    for name in ONNXRUNTIME_DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def import_onnxruntime():
    """The `onnxruntime` module, or OnnxRuntimeMissingError with a one-line fix."""
    try:
        import onnxruntime
    except ImportError as exc:
        installed = installed_onnxruntime_distributions()
        if not installed:
            raise OnnxRuntimeMissingError(f"onnxruntime is not installed: {INSTALL_HINT}") from None
        reason = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise OnnxRuntimeMissingError(
            f"onnxruntime is installed ({', '.join(installed)}) but cannot be imported: {reason[:200]}"
        ) from None
    return onnxruntime


def cuda_install_hint() -> str:
    """What to run when the CUDA execution provider is missing, for the builds that are installed now."""
    installed = installed_onnxruntime_distributions()
    others = [d for d in installed if d != "onnxruntime-gpu"]
    if "onnxruntime-gpu" in installed and others:
        return (f"{' and '.join(installed)} are installed side by side and share one module: "
                f"pip uninstall -y {' '.join(installed)} && pip install 'xrlflow[gpu]'")
    if "onnxruntime-gpu" in installed:
        return "onnxruntime-gpu is installed but cannot use CUDA here (check the CUDA and cuDNN libraries it needs)"
    if others:
        return f"pip uninstall -y {' '.join(others)} && pip install 'xrlflow[gpu]'"
    return "pip install 'xrlflow[gpu]'"
