"""Rollouts on Ray: `RayVecEnv`, an SB3 VecEnv whose sub-environments are Ray actors.

Each step returns the next action mask with the observation, so `env_method("action_masks")` (what
MaskablePPO calls before every step) is answered from the cached copy without a round trip. Auto-reset,
seeds, options and infos follow DummyVecEnv, so the same seed gives the same rollouts. The Ray connection is
opened by `xrlflow.measure_pool.RaySession`; Ray itself is imported only when a RayVecEnv is made.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from xrlflow.errors import BadInputError
from xrlflow.ray_session import import_ray

class EnvActor:
    """One sub-environment in a Ray actor; steps auto-reset like DummyVecEnv and carry the next action mask."""

    def __init__(self, env_fn: Callable[[], Any]) -> None:
        self.env = env_fn()
        try:
            self.mask_fn = self.env.get_wrapper_attr("action_masks")
        except AttributeError:
            self.mask_fn = None

    def spaces(self) -> tuple[Any, Any]:
        return self.env.observation_space, self.env.action_space

    def _mask(self) -> np.ndarray | None:
        return None if self.mask_fn is None else np.asarray(self.mask_fn())

    def reset(self, seed: int | None, options: dict[str, Any]) -> tuple[Any, dict[str, Any], np.ndarray | None]:
        obs, info = self.env.reset(seed=seed, **({"options": options} if options else {}))
        return obs, info, self._mask()

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = terminated or truncated
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info: dict[str, Any] | None = None
        if done:
            info["terminal_observation"] = obs
            obs, reset_info = self.env.reset()
        return obs, float(reward), bool(done), info, reset_info, self._mask()

    def get_attr(self, name: str) -> Any:
        return self.env.get_wrapper_attr(name)

    def has_attr(self, name: str) -> bool:
        try:
            self.env.get_wrapper_attr(name)
            return True
        except AttributeError:
            return False

    def set_attr(self, name: str, value: Any) -> None:
        self.env.set_wrapper_attr(name, value)

    def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def is_wrapped(self, wrapper_class: type) -> bool:
        return is_wrapped(self.env, wrapper_class)

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()


MASK_METHOD = "action_masks"


def _stack(observations: list[Any], space: Any) -> Any:
    if isinstance(space, spaces.Dict):
        return {k: np.stack([o[k] for o in observations]) for k in space.spaces}
    if isinstance(space, spaces.Tuple):
        return tuple(np.stack([o[i] for o in observations]) for i in range(len(space.spaces)))
    return np.stack(observations)


class RayVecEnv(VecEnv):
    """An SB3 VecEnv whose sub-environments are Ray actors (see the module docstring)."""

    def __init__(self, env_fns: Sequence[Callable[[], Any]], num_cpus_per_env: float = 1.0) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            raise BadInputError("RayVecEnv needs a Ray connection (--ray-address)")
        if not env_fns:
            raise BadInputError("RayVecEnv needs at least one environment")
        remote = ray.remote(EnvActor).options(num_cpus=num_cpus_per_env)
        self.actors = [remote.remote(fn) for fn in env_fns]
        self.round_trips = 0  # batched remote calls (one per step); tests check masks add none
        observation_space, action_space = self._gather([self.actors[0].spaces.remote()])[0]
        self._masks: list[np.ndarray | None] = [None] * len(env_fns)
        self._pending: list[Any] | None = None
        self._closed = False
        super().__init__(len(env_fns), observation_space, action_space)

    def _gather(self, refs: list[Any]) -> list[Any]:
        import ray

        self.round_trips += 1
        return ray.get(refs)

    def _indices(self, indices: Any) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def reset(self):
        results = self._gather([a.reset.remote(self._seeds[i], self._options[i])
                                for i, a in enumerate(self.actors)])
        observations = []
        for i, (obs, info, mask) in enumerate(results):
            observations.append(obs)
            self.reset_infos[i] = info
            self._masks[i] = mask
        self._reset_seeds()
        self._reset_options()
        return _stack(observations, self.observation_space)

    def step_async(self, actions: np.ndarray) -> None:
        self._pending = [a.step.remote(action) for a, action in zip(self.actors, actions)]

    def step_wait(self):
        assert self._pending is not None, "step_async first"
        results = self._gather(self._pending)
        self._pending = None
        observations, rewards, dones, infos = [], [], [], []
        for i, (obs, reward, done, info, reset_info, mask) in enumerate(results):
            observations.append(obs)
            rewards.append(reward)
            dones.append(done)
            infos.append(info)
            if reset_info is not None:
                self.reset_infos[i] = reset_info
            self._masks[i] = mask
        return (_stack(observations, self.observation_space), np.asarray(rewards, dtype=np.float32),
                np.asarray(dones, dtype=bool), infos)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        chosen = self._indices(indices)
        if method_name == MASK_METHOD and not method_args and not method_kwargs \
                and all(self._masks[i] is not None for i in chosen):
            return [self._masks[i].copy() for i in chosen]  # type: ignore[union-attr]
        return self._gather([self.actors[i].call.remote(method_name, method_args, method_kwargs)
                             for i in chosen])

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        chosen = self._indices(indices)
        if attr_name == MASK_METHOD and all(self._masks[i] is not None for i in chosen):
            # A bound method cannot cross processes: hand out callables over the cached masks.
            return [_CachedMask(self._masks[i]) for i in chosen]
        return self._gather([self.actors[i].get_attr.remote(attr_name) for i in chosen])

    def has_attr(self, attr_name: str) -> bool:
        return all(self._gather([a.has_attr.remote(attr_name) for a in self.actors]))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        self._gather([self.actors[i].set_attr.remote(attr_name, value) for i in self._indices(indices)])

    def env_is_wrapped(self, wrapper_class: type, indices=None) -> list[bool]:
        return self._gather([self.actors[i].is_wrapped.remote(wrapper_class) for i in self._indices(indices)])

    def get_images(self) -> Sequence[np.ndarray | None]:
        if self.render_mode != "rgb_array":
            warnings.warn(f"render_mode is {self.render_mode!r}, not 'rgb_array': no images", UserWarning)
            return [None for _ in self.actors]
        return self._gather([a.render.remote() for a in self.actors])

    def close(self) -> None:
        if self._closed:
            return
        import ray

        self._closed = True
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=30)
        except Exception:  # an actor that died has nothing left to close
            pass
        for actor in self.actors:
            ray.kill(actor)


class _CachedMask:
    """Stands in for a sub-env's bound `action_masks` method: returns the mask cached at the last step."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def __call__(self) -> np.ndarray:
        return self.mask.copy()


def make_ray_vec_env(env_fns: Sequence[Callable[[], Any]], num_cpus_per_env: float = 1.0) -> RayVecEnv:
    """A RayVecEnv over these factories (each runs in its own actor, reserving `num_cpus_per_env`)."""
    return RayVecEnv(env_fns, num_cpus_per_env)


__all__ = ["EnvActor", "RayVecEnv", "make_ray_vec_env"]
