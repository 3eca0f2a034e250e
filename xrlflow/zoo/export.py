"""Exporting zoo models to ONNX, and the on-disk cache of exports (keyed by every parameter)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch

from xrlflow.atomic import replacing, replacing_with_companion, write_bytes
from xrlflow.errors import BadInputError
from xrlflow.zoo.registry import BUILDER_VERSION, OPSET, BuiltModel, ModelConfig, build_from_config, resolve_config

CACHE_DIR_ENV_VAR = "XRLFLOW_CACHE_DIR"
# Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**27


# ---------------------------------------------------------------------------------------------------------------
# Export and cache
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    override = os.environ.get(CACHE_DIR_ENV_VAR)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xrlflow" / "zoo"


def _inline_initializer_identities(graph: onnx.GraphProto) -> None:
    """The TorchScript exporter deduplicates equal initializers by routing one through Identity nodes; point the
    consumers at the initializer itself so the graph holds only real operators."""
    initializers = {init.name for init in graph.initializer}
    graph_outputs = {out.name for out in graph.output}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in graph_outputs:
            renamed[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    if not renamed:
        return
    for node in kept:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept)
    value_infos = [info for info in graph.value_info if info.name not in renamed]
    del graph.value_info[:]
    graph.value_info.extend(value_infos)


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(
        int(np.prod(init.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        for init in model.graph.initializer
    )


def _export_onnx(built: BuiltModel, work_dir: Path) -> onnx.ModelProto:
    raw_path = work_dir / "torch_export.onnx"
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated and that PRESERVE mode should not constant-fold; the
        # module is in eval mode, so folding is safe, and PRESERVE keeps BatchNorm instead of fusing it into Conv.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            built.module,
            built.inputs,
            str(raw_path),
            opset_version=OPSET,
            dynamo=False,
            input_names=built.input_names,
            output_names=built.output_names,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )
    model = onnx.load(str(raw_path))
    _inline_initializer_identities(model.graph)
    config = built.config
    metadata = {"xrlflow.zoo.model": config.name, "xrlflow.zoo.config": json.dumps(asdict(config), sort_keys=True)}
    metadata["xrlflow.zoo.builder_version"] = str(BUILDER_VERSION)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model


def _save_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write `path` (and `path`.data for models over the protobuf limit) atomically, the data first, so a reader
    that sees the .onnx file always sees complete data."""
    data_name = path.name + ".data"
    with replacing_with_companion(path, data_name) as tmp_model:
        if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            tmp_model.write_bytes(model.SerializeToString())


def cached_export_path(config: ModelConfig, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached export of `config`, exporting it first if it is not cached yet."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / (config.file_stem() + ".onnx")
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    built = build_from_config(config)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-export-") as tmp:
        model = _export_onnx(built, Path(tmp))
    _save_atomically(model, path)
    summary = {
        "config": asdict(config),
        "nodes": len(model.graph.node),
        "params": sum(p.numel() for p in built.module.parameters()),
        "export_seconds": round(time.perf_counter() - started, 3),
    }
    write_bytes(path.with_suffix(".json"), (json.dumps(summary, indent=2) + "\n").encode())
    return path


def cached_summary(config: ModelConfig, cache_dir: str | os.PathLike[str] | None = None) -> dict | None:
    """The summary written next to a cached export (nodes, params, export time), or None if it is not cached."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    summary_path = directory / (config.file_stem() + ".json")
    if not summary_path.is_file() or not summary_path.with_suffix(".onnx").is_file():
        return None
    try:
        return json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None


def export_model(
    name: str,
    small: bool = False,
    batch: int | None = None,
    seq: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> onnx.ModelProto:
    """The ONNX export of a zoo model (external data loaded), from the cache when it is there."""
    return onnx.load(str(cached_export_path(resolve_config(name, small, batch, seq), cache_dir)))


def export_model_to_file(
    name: str,
    path: str | os.PathLike[str],
    small: bool = False,
    batch: int | None = None,
    seq: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a zoo model to `path` atomically (with `path`.data next to it for models over 2 GB)."""
    source = cached_export_path(resolve_config(name, small, batch, seq), cache_dir)
    target = Path(path)
    if target.is_dir():
        raise BadInputError(f"{target}: is a directory; give the output file name")
    if not target.parent.is_dir():
        raise BadInputError(f"{target.parent}: no such directory")
    if source.with_name(source.name + ".data").is_file():
        _save_atomically(onnx.load(str(source)), target)
    else:
        with replacing(target, suffix=".onnx") as tmp_target:
            shutil.copyfile(source, tmp_target)
    return target
