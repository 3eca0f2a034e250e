"""onnxruntime pipeline stages: transformer fusions (with crash handling) and the float16 conversion."""

from __future__ import annotations

import numpy as np
import onnx

from tests.attentionexports import hf_exports, zoo_exports  # noqa: F401  (pytest fixtures)
from tests.attentiongen import AttentionSpec, attention_model
from tests.test_rule_fuse_multihead_attention import fuse_everywhere
from xrlflow.onnx_io import load_graph, to_model
from xrlflow.ort_stages import (
    FLOAT16_TOLERANCE, OrtFusionOptions, detect_model_type, float16_stage, infer_attention_dims,
    ort_transformer_fusions, verify_float16,
)
from xrlflow.verify import Tolerance, verify_models

FP32 = Tolerance(rtol=1e-4, atol=1e-4)


def snapshot(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def test_bert_dynamo_export_gets_fusions_and_stays_equal(hf_exports):
    model = onnx.load(str(hf_exports("bert", "eager")))
    before = snapshot(model)
    assert detect_model_type(model) == "bert"
    assert infer_attention_dims(model) == (4, 64)
    result = ort_transformer_fusions(model)
    assert snapshot(model) == before  # the input is never modified
    assert result.changed and not result.warning
    assert result.fused.get("SkipLayerNormalization", 0) >= 2 and result.fused.get("BiasGelu") == 2
    assert "SkipLayerNormalization" in result.note
    assert any(n.op_type == "SkipLayerNormalization" for n in result.model.graph.node)
    assert ("com.microsoft", 1) in [(o.domain, o.version) for o in result.model.opset_import]
    for seed in range(2):
        report = verify_models(model, result.model, tolerance=FP32, seed=seed)
        assert report.ok, report.to_dict()


def test_opt_level_one_runs_onnxruntime_basic_optimisations_too(hf_exports):
    model = onnx.load(str(hf_exports("bert", "eager")))
    basic = ort_transformer_fusions(model, OrtFusionOptions(opt_level=1))  # through a file (see the stage)
    assert not basic.warning and basic.fused.get("SkipLayerNormalization", 0) >= 2
    report = verify_models(model, basic.model, tolerance=FP32)
    assert report.ok, report.to_dict()


def test_fusions_after_xrlflow_attention_fusion(hf_exports):
    model = onnx.load(str(hf_exports("bert", "sdpa")))
    fused, count = fuse_everywhere(load_graph(model), "fuse-multihead-attention")
    assert count == 2
    rewritten = to_model(fused, fold_constants=True)
    result = ort_transformer_fusions(rewritten)
    assert not result.warning and result.fused.get("SkipLayerNormalization", 0) >= 2
    assert sum(n.op_type == "MultiHeadAttention" for n in result.model.graph.node) == 2
    report = verify_models(model, result.model, tolerance=FP32)
    assert report.ok, report.to_dict()


def test_gpt2_dynamo_crash_is_a_warning_and_the_model_is_unchanged(hf_exports):
    model = onnx.load(str(hf_exports("gpt2", "sdpa")))
    before = snapshot(model)
    assert detect_model_type(model) == "gpt2"
    result = ort_transformer_fusions(model, OrtFusionOptions(fallback_model_type=None))
    assert not result.changed and result.model is model and snapshot(model) == before
    assert "IndexError" in result.warning and "unchanged" in result.warning


def test_gpt2_dynamo_crash_falls_back_to_the_generic_fusions(hf_exports):
    model = onnx.load(str(hf_exports("gpt2", "sdpa")))
    before = snapshot(model)
    result = ort_transformer_fusions(model)
    assert snapshot(model) == before
    assert "IndexError" in result.warning and "bert fusions were applied instead" in result.warning
    assert result.changed and result.fused.get("SkipLayerNormalization", 0) >= 2
    report = verify_models(model, result.model, tolerance=FP32)
    assert report.ok, report.to_dict()


def test_xrlflow_fusion_still_applies_where_onnxruntime_crashes(hf_exports):
    model = onnx.load(str(hf_exports("gpt2", "eager")))
    fused, count = fuse_everywhere(load_graph(model), "fuse-packed-qkv-attention")
    assert count == 2
    rewritten = to_model(fused, fold_constants=True)
    result = ort_transformer_fusions(rewritten, OrtFusionOptions(model_type="gpt2"))
    final = result.model  # the gpt2 optimizer still crashes; the generic fusions apply
    assert "IndexError" in result.warning and result.fused.get("SkipLayerNormalization", 0) >= 2
    assert sum(n.op_type == "Attention" for n in final.graph.node) == 2
    report = verify_models(model, final, tolerance=FP32)
    assert report.ok, report.to_dict()


def test_unrecognised_model_is_skipped():
    from tests.rulecheck import ModelBuilder

    b = ModelBuilder(0)
    x = b.input("x", [2, 3])
    b.output(b.op("Relu", [b.op("MatMul", [x, b.const((3, 4))])]))
    model = b.model()
    assert detect_model_type(model) is None
    result = ort_transformer_fusions(model)
    assert not result.changed and result.model is model and "not recognised" in result.note


def test_zoo_metadata_names_the_model_type(zoo_exports):
    assert detect_model_type(onnx.load(str(zoo_exports("vit-base")))) == "vit"
    assert detect_model_type(onnx.load(str(zoo_exports("gpt2")))) == "gpt2"


def test_graph_detection_sees_causal_and_image_models(hf_exports):
    assert detect_model_type(onnx.load(str(hf_exports("gpt2", "eager")))) == "gpt2"
    assert detect_model_type(onnx.load(str(hf_exports("vit", "eager")))) == "vit"


def test_float16_of_the_fused_model_within_fp16_tolerance(hf_exports):
    model = onnx.load(str(hf_exports("bert", "eager")))
    fused = ort_transformer_fusions(model).model
    before = snapshot(fused)
    half = float16_stage(fused)
    assert snapshot(fused) == before and half.changed and not half.warning
    # inputs and outputs keep their types; the weights are float16
    assert [vi.type.tensor_type.elem_type for vi in half.model.graph.output] == \
        [vi.type.tensor_type.elem_type for vi in model.graph.output]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.model.graph.initializer)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1 for t in half.model.graph.initializer)
    # onnxruntime's CPU EP runs this fp16 graph (SkipLayerNormalization, BiasGelu, MatMul in fp16)
    for seed in range(2):
        report = verify_float16(model, half.model, seed=seed)
        assert report.ok, report.to_dict()
        assert max(o.max_abs_error for o in report.outputs) > 0  # it really computed in fp16
    # and the fp16 tolerance is tight enough to catch a broken model
    broken = onnx.ModelProto()
    broken.CopyFrom(half.model)
    weight = max(broken.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array((arr * 1.5).astype(arr.dtype), weight.name))
    assert not verify_float16(model, broken).ok


def test_float16_of_an_xrlflow_fused_attention_block():
    model = attention_model(AttentionSpec(batch=1, seq=6, hidden=8, heads=2, mask="causal", seed=3))
    fused, count = fuse_everywhere(load_graph(model), "fuse-multihead-attention")
    assert count == 1
    half = float16_stage(to_model(fused, fold_constants=True))
    assert not half.warning
    mha = next(n for n in half.model.graph.node if n.op_type == "MultiHeadAttention")
    assert mha.domain == "com.microsoft"
    # the whole block computes in fp16: the only Casts are at the graph input and output
    assert sum(n.op_type == "Cast" for n in half.model.graph.node) == 2
    report = verify_float16(model, half.model, tolerance=FLOAT16_TOLERANCE)  # the CPU EP has an fp16 MHA kernel
    assert report.ok, report.to_dict()


# ---- the optimize pipeline's stages on real exports ---------------------------------------------------------
def _pipeline(path, **settings):
    from xrlflow.optimizer import OptimizeConfig, optimize
    from xrlflow.search import SearchConfig

    config = OptimizeConfig(search="greedy", latency="cost", search_config=SearchConfig(steps=60), **settings)
    return optimize(str(path), config)


def _contrib_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.domain == "com.microsoft"]


def test_gpt2_block_end_to_end_gets_xrlflow_rewrites_and_a_warning_where_onnxruntime_crashes(hf_exports):
    path = hf_exports("gpt2", "eager")  # fused c_attn, causal mask
    result = _pipeline(path, ort_fusions="on")
    report = result.report
    assert report["rewrites_by_rule"].get("fuse-packed-qkv-attention") == 2
    xrlflow_stage, ort_stage = report["stages"]
    assert xrlflow_stage["applied"] and ort_stage["name"] == "onnxruntime fusions"
    assert any("IndexError" in w for w in report["warnings"]) and "IndexError" in ort_stage["warning"]
    assert ort_stage["applied"] and ort_stage["verified"] and ort_stage["fused"].get("SkipLayerNormalization", 0) >= 2
    assert _contrib_ops(result.model).count("Attention") == 2
    check = verify_models(onnx.load(str(path)), result.model, tolerance=FP32)
    assert check.ok, check.to_dict()


def test_no_ort_fusions_leaves_no_contrib_op(hf_exports):
    for path in (hf_exports("gpt2", "eager"), hf_exports("bert", "eager")):
        with_contrib = _pipeline(path, ort_fusions="on")
        assert _contrib_ops(with_contrib.model)
        plain = _pipeline(path, no_ort_fusions=True)
        assert not _contrib_ops(plain.model)
        assert not any(r.startswith("fuse-") and "attention" in r for r in plain.report["rules"])
        assert [s["name"] for s in plain.report["stages"]] == ["xrlflow rewrites"]
        assert verify_models(onnx.load(str(path)), plain.model, tolerance=FP32).ok


def test_cpu_default_leaves_onnxruntime_fusions_out_and_cuda_default_runs_them(hf_exports):
    from xrlflow.optimizer import OptimizeConfig

    result = _pipeline(hf_exports("bert", "eager"))
    assert [s["name"] for s in result.report["stages"]] == ["xrlflow rewrites"]
    assert OptimizeConfig(device="cuda").uses_ort_fusions


def test_legacy_bert_with_01_masks_writes_only_what_verifies(hf_exports, tmp_path):
    """onnxruntime's attention fusion on legacy exports was found inexact with 0/1 masks: whatever the stage
    does, the written model verifies at 0/1 masks, or the stage is dropped."""
    from tests.attentionexports import BATCH, SEQ

    path = hf_exports("bert", "eager", dynamo=False)
    rng = np.random.default_rng(3)
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[0, SEQ // 2:] = 0
    feeds = {"input_ids": rng.integers(0, 100, (BATCH, SEQ)).astype(np.int64), "attention_mask": mask}
    np.savez(tmp_path / "feeds.npz", **feeds)
    result = _pipeline(path, ort_fusions="on", inputs=str(tmp_path / "feeds.npz"))
    stage = next(s for s in result.report["stages"] if s["name"] == "onnxruntime fusions")
    assert stage["verified"] is not None
    assert (stage["applied"] and stage["verified"]) or (not stage["applied"] and "dropped" in stage)
    assert verify_models(onnx.load(str(path)), result.model, feeds).ok


def test_float16_stage_in_the_pipeline_is_verified_against_the_fp32_original():
    model = attention_model(AttentionSpec())
    from xrlflow.optimizer import OptimizeConfig, optimize

    result = optimize(model, OptimizeConfig(search="greedy", latency="cost", float16=True))
    stage = next(s for s in result.report["stages"] if s["name"] == "float16")
    assert stage["verified"] is not None
    if stage["applied"]:
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)
        assert verify_float16(model, result.model).ok
        assert [i.type.tensor_type.elem_type for i in result.model.graph.input] == \
            [i.type.tensor_type.elem_type for i in model.graph.input]
    else:  # the CPU EP could not run it at fp16 tolerances: dropped, and said so
        assert "dropped" in stage and any("float16" in w for w in result.report["warnings"])
        assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)
