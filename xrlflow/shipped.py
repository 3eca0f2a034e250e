"""The policies shipped with xrlflow: package data `xrlflow.checkpoints` (the checkout's checkpoints/ folder).

`resolve_policy` turns what a user passes to `--policy` into a checkpoint path: nothing means the default
shipped policy; an existing path is used as it is; a shipped name (`xrlflow-h200`) or the checkout-relative
path the README uses (`checkpoints/xrlflow-h200`) finds the installed copy, so the same commands work from
an installed wheel outside the checkout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePath

from xrlflow.errors import BadInputError
from xrlflow.names import did_you_mean

DEFAULT_POLICY = "xrlflow-h200"
# Every shipped run, each listed file by file in pyproject.toml's package-data (tests/test_packaging.py checks).
SHIPPED_POLICIES: tuple[str, ...] = ("xrlflow-h200",)
SHIPPED_FILES: tuple[str, ...] = ("policy.zip", "run.json", "reward_normalization.pkl", "MODEL_CARD.md")
POLICY_FILE = "policy.zip"
_CHECKOUT_FOLDER = "checkpoints"


def shipped_checkpoints_dir() -> Path:
    """Where the shipped runs are installed (the checkout's checkpoints/ under an editable install)."""
    from importlib.resources import files

    try:
        return Path(str(files("xrlflow.checkpoints")))
    except ModuleNotFoundError:
        raise BadInputError("the shipped policies are not installed (no package xrlflow.checkpoints): reinstall xrlflow") from None


def shipped_policy(name: str = DEFAULT_POLICY) -> Path:
    """The folder of a shipped run by name; BadInputError (with the nearest name) for an unknown one."""
    if name not in SHIPPED_POLICIES:
        raise BadInputError(f"no shipped policy {name!r}{did_you_mean(name, SHIPPED_POLICIES)}; shipped: {', '.join(SHIPPED_POLICIES)}")
    folder = shipped_checkpoints_dir() / name
    missing = [f for f in (POLICY_FILE, "run.json") if not (folder / f).is_file()]
    if missing:
        raise BadInputError(f"the shipped policy {name} is incomplete ({', '.join(missing)} missing in {folder}): reinstall xrlflow")
    return folder


def resolve_policy(spec: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint (a run folder or its policy.zip) that `--policy SPEC` means; None or "" is the default."""
    if spec is None or str(spec) == "":
        return shipped_policy(DEFAULT_POLICY)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    name, file = _shipped_name(PurePath(str(spec)))
    if name in SHIPPED_POLICIES:
        folder = shipped_policy(name)
        return folder / file if file else folder
    choices = SHIPPED_POLICIES + tuple(f"{_CHECKOUT_FOLDER}/{n}" for n in SHIPPED_POLICIES)
    raise BadInputError(
        f"{spec}: no such policy (a checkpoint folder or its {POLICY_FILE}, or a shipped name){did_you_mean(str(spec), choices)}; "
        f"shipped: {', '.join(SHIPPED_POLICIES)}"
    )


def _shipped_name(spec: PurePath) -> tuple[str, str]:
    """(run name, file inside it or "") for `NAME`, `checkpoints/NAME`, `NAME/policy.zip`, `checkpoints/NAME/policy.zip`."""
    parts = list(spec.parts)
    file = ""
    if parts and parts[-1] == POLICY_FILE:
        file = parts.pop()
    if len(parts) == 2 and parts[0] == _CHECKOUT_FOLDER:
        parts.pop(0)
    return (parts[0], file) if len(parts) == 1 else ("", "")


def policy_target_device(checkpoint: str | os.PathLike[str]) -> str | None:
    """The device a checkpoint's policy was trained to optimise for (its run.json's train_config.device: the
    device of its reward), or None when run.json is missing, unreadable or does not say (the loader refuses
    such checkpoints with its own message)."""
    path = Path(checkpoint)
    meta = (path if path.is_dir() else path.parent) / "run.json"
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    train = data.get("train_config") if isinstance(data, dict) else None
    device = train.get("device") if isinstance(train, dict) else None
    return device if isinstance(device, str) else None


def device_mismatch(checkpoint: str | os.PathLike[str], device: str) -> str | None:
    """A warning when the policy at `checkpoint` was trained for another device than `device`, else None."""
    trained_for = policy_target_device(checkpoint)
    if trained_for is None or trained_for == device:
        return None
    return (f"the policy {checkpoint} was trained for --device {trained_for} (its run.json) but this run optimises "
            f"for --device {device}: its choices aim at the other device's latencies; pass --device {trained_for} "
            f"or use a policy trained for {device}")
