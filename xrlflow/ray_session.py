"""Connecting to Ray: `RaySession(address)` with `local` (start Ray on this machine), `auto` (the cluster this
machine belongs to) or `HOST:PORT` (a cluster's GCS). The address is probed with a TCP connect before
`ray.init`, which otherwise retries an unreachable address for minutes; an unreachable one is a BadInputError.

Ray is optional (`pip install 'xrlflow[distributed]'`) and imported only inside this module's functions.
Multi-node clusters need xrlflow installed (same version) on every node; nothing is shipped in a runtime env.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from xrlflow.errors import BadInputError

RAY_MISSING = "Ray is not installed: pip install 'xrlflow[distributed]'"
RAY_ADDRESS_HELP = "use local, auto or HOST:PORT"


def import_ray():
    try:
        import ray
    except ImportError:
        raise BadInputError(RAY_MISSING) from None
    return ray

@dataclass(frozen=True)
class RayConfig:
    address: str = "local"  # local | auto | HOST:PORT
    connect_timeout_s: float = 10.0  # TCP probe of the address; ray.init itself retries for minutes
    # Only for `local` (a cluster that is joined brings its own resources):
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_memory: int | None = None  # bytes

    def __post_init__(self) -> None:
        if not self.address or not self.address.strip():
            raise BadInputError(f"--ray-address is empty: {RAY_ADDRESS_HELP}")
        if self.connect_timeout_s <= 0:
            raise BadInputError("the Ray connect timeout must be positive")


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInputError(f"--ray-address {address!r}: {RAY_ADDRESS_HELP}")
    return host, int(port)


def _probe(address: str, timeout_s: float) -> None:
    host, port = _split_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise BadInputError(f"--ray-address {address}: no Ray cluster reachable there ({reason})") from None


def resolve_address(config: RayConfig) -> str | None:
    """The GCS address to join (probed), or None for `local` (start a fresh instance)."""
    address = config.address.strip()
    if address == "local":
        return None
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except Exception as exc:  # Ray raises ConnectionError when it finds no running instance
            raise BadInputError(f"--ray-address auto: {str(exc).splitlines()[0]}") from None
        if not found:
            raise BadInputError("--ray-address auto: no running Ray cluster on this machine")
        _probe(found, config.connect_timeout_s)
        return found
    if "://" in address:
        raise BadInputError(f"--ray-address {address!r}: Ray client addresses are not supported; {RAY_ADDRESS_HELP}")
    _probe(address, config.connect_timeout_s)
    return address


class RaySession:
    """Connects this process to Ray; `close()` disconnects (and stops a `local` instance) only if this session
    connected it. A process already connected (a test's cluster, a caller's ray.init) is reused."""

    def __init__(self, config: RayConfig | str = RayConfig()) -> None:
        if isinstance(config, str):
            config = RayConfig(address=config)
        self.config = config
        ray = import_ray()
        self.owned = False
        if ray.is_initialized():
            return
        address = resolve_address(config)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs.update(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                          object_store_memory=config.object_store_memory)
        else:
            kwargs.update(address=address)
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise BadInputError(f"--ray-address {config.address}: {str(exc).splitlines()[0]}") from None
        self.owned = True

    def close(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()
            self.owned = False

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["RayConfig", "RaySession", "resolve_address", "import_ray", "RAY_MISSING"]
