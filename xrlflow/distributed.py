"""Transitional: the names xrlflow/train.py and xrlflow/measure_cli.py still import from here. Their homes are
`xrlflow.ray_session` (RaySession), `xrlflow.measure_pool` (MeasurementPool, PoolConfig) and
`xrlflow.agents.ray_vec_env` (make_ray_vec_env); delete this module once those two import from there."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "RaySession": "xrlflow.ray_session",
    "MeasurementPool": "xrlflow.measure_pool",
    "PoolConfig": "xrlflow.measure_pool",
    "make_ray_vec_env": "xrlflow.agents.ray_vec_env",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'xrlflow.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
