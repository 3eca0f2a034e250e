"""Model zoo: every small variant exports, checks, runs in onnxruntime and matches PyTorch; caching; bad input."""

from __future__ import annotations

import argparse
import collections

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from xrlflow import zoo
from xrlflow.zoo import export as zoo_export
from xrlflow.errors import BadInputError

MODEL_NAMES = [entry.name for entry in zoo.list_models()]
CNN_NAMES = ["resnet50", "resnext50", "inception-v3", "squeezenet", "nasnet-a"]
TRANSFORMER_NAMES = ["bert-base", "bert-xrl", "vit-base", "vit-xrl", "mini-dalle", "transformer-transducer", "gpt2"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-cache")


def run_onnxruntime(model: onnx.ModelProto, built: zoo.BuiltModel) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {name: tensor.numpy() for name, tensor in zip(built.input_names, built.inputs)}
    (output,) = session.run(None, feeds)
    return output


def test_registry_has_every_model_of_the_issue():
    assert set(MODEL_NAMES) == set(CNN_NAMES) | set(TRANSFORMER_NAMES)
    assert len(MODEL_NAMES) == 12


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_small_variant_exports_checks_and_matches_pytorch(name, shared_cache):
    model = zoo.export_model(name, small=True, cache_dir=shared_cache)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == zoo.OPSET

    built = zoo.build_model(name, small=True)
    for graph_input, tensor in zip(model.graph.input, built.inputs):
        dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        assert dims == list(tensor.shape), "inputs must have static shapes"
    with torch.no_grad():
        expected = built.module(*built.inputs).numpy()
    actual = run_onnxruntime(model, built)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_small_variant_uses_the_real_operators(name, shared_cache):
    ops = collections.Counter(node.op_type for node in zoo.export_model(name, small=True, cache_dir=shared_cache).graph.node)
    assert "Identity" not in ops and "Shape" not in ops
    if name in TRANSFORMER_NAMES:
        assert ops["Softmax"] > 0 and ops["LayerNormalization"] > 0
    if name in ("bert-base", "bert-xrl", "vit-base", "vit-xrl", "gpt2"):
        assert ops["Erf"] > 0  # GELU, erf form
    if name in ("resnet50", "resnext50", "inception-v3", "nasnet-a"):
        assert ops["BatchNormalization"] > 0, "BatchNorm must not be fused into Conv"
    if name in CNN_NAMES:
        assert ops["MaxPool"] + ops["AveragePool"] + ops["GlobalAveragePool"] > 0


@pytest.mark.parametrize("name", ["bert-base", "mini-dalle"])
def test_attention_has_parallel_projections_sharing_an_input(name, shared_cache):
    graph = zoo.export_model(name, small=True, cache_dir=shared_cache).graph
    readers = collections.Counter(node.input[0] for node in graph.node if node.op_type == "MatMul")
    # Q, K and V (and the gated FFN's two input projections) read the same tensor.
    assert max(readers.values()) >= 3


def test_inception_has_parallel_convs_sharing_an_input(shared_cache):
    graph = zoo.export_model("inception-v3", small=True, cache_dir=shared_cache).graph
    readers = collections.Counter(node.input[0] for node in graph.node if node.op_type == "Conv")
    assert max(readers.values()) >= 3


def test_same_parameters_give_identical_bytes(tmp_path):
    for name in ("bert-base", "resnet50"):
        first = zoo.export_model(name, small=True, cache_dir=tmp_path / "a").SerializeToString()
        second = zoo.export_model(name, small=True, cache_dir=tmp_path / "b").SerializeToString()
        assert first == second


def test_cache_hit_returns_the_same_bytes_without_rebuilding(tmp_path, monkeypatch):
    first = zoo.export_model("squeezenet", small=True, cache_dir=tmp_path)
    cached = list(tmp_path.glob("squeezenet-small-*.onnx"))
    assert len(cached) == 1
    assert not list(tmp_path.glob(".tmp-*")), "temporary files must not be left behind"

    def fail_build(config):
        raise AssertionError(f"rebuilt {config} despite a cache hit")

    monkeypatch.setattr(zoo_export, "build_from_config", fail_build)
    second = zoo.export_model("squeezenet", small=True, cache_dir=tmp_path)
    assert second.SerializeToString() == first.SerializeToString() == cached[0].read_bytes()
    with pytest.raises(AssertionError, match="rebuilt"):
        zoo.export_model("squeezenet", small=True, batch=2, cache_dir=tmp_path)


def test_cache_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_DIR_ENV_VAR, str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    zoo.export_model("vit-xrl", small=True)
    assert list(tmp_path.glob("vit-xrl-small-*.onnx"))


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(zoo.CACHE_DIR_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path / "xrlflow" / "zoo"


def test_batch_and_seq_change_the_input_shapes(tmp_path):
    model = zoo.export_model("gpt2", small=True, batch=2, seq=8, cache_dir=tmp_path)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 8]
    built = zoo.build_model("gpt2", small=True, batch=2, seq=8)
    with torch.no_grad():
        expected = built.module(*built.inputs).numpy()
    np.testing.assert_allclose(run_onnxruntime(model, built), expected, rtol=1e-3, atol=1e-4)

    image_model = zoo.export_model("squeezenet", small=True, batch=2, cache_dir=tmp_path)
    assert image_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_unknown_name_raises_bad_input():
    with pytest.raises(BadInputError, match="unknown zoo model 'alexnet'"):
        zoo.export_model("alexnet")


@pytest.mark.parametrize("name", CNN_NAMES + ["vit-base"])
def test_seq_on_an_image_model_raises_bad_input(name):
    with pytest.raises(BadInputError, match="--seq does not apply"):
        zoo.export_model(name, seq=64)


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"seq": -1}, {"batch": True}, {"seq": 1.5}, {"seq": 100_000}])
def test_bad_parameters_raise_bad_input(kwargs):
    with pytest.raises(BadInputError):
        zoo.export_model("bert-base", **kwargs)


def test_parameter_counts_match_the_reference_architectures():
    # bert-base: the reference 109.5M less the pooler and token-type embeddings, which the zoo model leaves out;
    # inception-v3: without the auxiliary classifier.
    expected_millions = {"bert-base": 108.9, "gpt2": 124.4, "vit-base": 86.6, "resnet50": 25.6, "resnext50": 25.0,
                         "inception-v3": 23.8, "squeezenet": 1.2, "nasnet-a": 5.3}
    for name, millions in expected_millions.items():
        assert zoo.count_parameters(zoo.resolve_config(name)) / 1e6 == pytest.approx(millions, abs=0.1), name


def test_large_models_are_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo_export, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    zoo.export_model_to_file("bert-xrl", output, small=True, cache_dir=tmp_path / "cache")
    assert (tmp_path / "out" / "model.onnx.data").is_file()
    assert list((tmp_path / "cache").glob("bert-xrl-small-*.onnx.data"))
    onnx.checker.check_model(str(output), full_check=True)
    built = zoo.build_model("bert-xrl", small=True)
    with torch.no_grad():
        expected = built.module(*built.inputs).numpy()
    np.testing.assert_allclose(run_onnxruntime(onnx.load(str(output)), built), expected, rtol=1e-3, atol=1e-4)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xrlflow")
    zoo.add_zoo_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_export_writes_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(zoo.CACHE_DIR_ENV_VAR, str(tmp_path / "cache"))
    output = tmp_path / "squeezenet.onnx"
    args = make_parser().parse_args(["zoo", "export", "squeezenet", "-o", str(output), "--small", "--batch", "2"])
    assert zoo.run_zoo_cli(args) == 0
    assert "wrote" in capsys.readouterr().out
    model = onnx.load(str(output))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_export_seq_on_a_cnn_raises_bad_input(tmp_path):
    args = make_parser().parse_args(["zoo", "export", "resnet50", "-o", str(tmp_path / "x.onnx"), "--seq", "64"])
    with pytest.raises(BadInputError, match="--seq does not apply to resnet50"):
        zoo.run_zoo_cli(args)
    assert not (tmp_path / "x.onnx").exists()


def test_cli_list_prints_every_model_with_cached_node_counts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(zoo.CACHE_DIR_ENV_VAR, str(tmp_path))
    zoo.export_model("squeezenet", small=True)
    assert zoo.run_zoo_cli(make_parser().parse_args(["zoo", "list", "--small"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "params", "nodes", "input"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(MODEL_NAMES)
    nodes = len(zoo.export_model("squeezenet", small=True).graph.node)
    assert rows["squeezenet"][2] == str(nodes)
    assert rows["gpt2"][2] == "-"
