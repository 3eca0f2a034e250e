import numpy as np
import pytest

from tests.rulecheck import ModelBuilder, assert_no_match, assert_rule_preserves, load_graph, ENGINE


def _conv_bn(seed, with_bias=True, training_mode=None, groups=1, relu=True):
    b = ModelBuilder(seed)
    rng = b.rng
    cin = int(rng.integers(1, 4)) * groups
    cout = int(rng.integers(1, 4)) * groups
    k = int(rng.choice([1, 3]))
    x = b.input("x", [1, cin, 6, 7])
    inputs = [x, b.const((cout, cin // groups, k, k))]
    if with_bias:
        inputs.append(b.const((cout,)))
    y = b.op("Conv", inputs, pads=[k // 2] * 4, group=groups)
    var = b.const((cout,), value=rng.uniform(0.5, 2.0, cout))
    attrs = {"epsilon": float(rng.uniform(1e-5, 1e-3))}
    if training_mode is not None:
        attrs["training_mode"] = training_mode
    y = b.op("BatchNormalization", [y, b.const((cout,)), b.const((cout,)), b.const((cout,)), var], **attrs)
    b.output(b.op("Relu", [y]) if relu else y)
    return b.model()


@pytest.mark.parametrize("seed,with_bias,groups,relu", [(0, True, 1, True), (1, False, 1, True), (2, True, 2, False), (3, False, 3, True)])
def test_fold_preserves_function(seed, with_bias, groups, relu):
    (folded,) = assert_rule_preserves(_conv_bn(seed, with_bias, groups=groups, relu=relu), "fold-batchnorm-into-conv")
    assert "BatchNormalization" not in folded.op_counts()


def test_near_miss_conv_output_read_twice():
    b = ModelBuilder(4)
    x = b.input("x", [1, 2, 5, 5])
    y = b.op("Conv", [x, b.const((3, 2, 1, 1))])
    var = b.const((3,), value=np.ones(3))
    bn = b.op("BatchNormalization", [y, b.const((3,)), b.const((3,)), b.const((3,)), var])
    b.output(bn, b.op("Relu", [y]))
    assert_no_match(b.model(), "fold-batchnorm-into-conv")


def test_near_miss_statistics_not_constant():
    b = ModelBuilder(5)
    x = b.input("x", [1, 2, 5, 5])
    mean = b.input("mean", [3])
    y = b.op("Conv", [x, b.const((3, 2, 1, 1))])
    b.output(b.op("BatchNormalization", [y, b.const((3,)), b.const((3,)), mean, b.const((3,), value=np.ones(3))]))
    assert_no_match(b.model(), "fold-batchnorm-into-conv")


def test_canonicalize_folds_every_batchnorm_of_a_zoo_cnn():
    from xrlflow.onnx_io import to_model
    from xrlflow.rules import CANONICAL_RULES
    from xrlflow.verify import verify_models
    from xrlflow.zoo import export_model

    model = export_model("inception-v3", small=True)
    graph = load_graph(model)
    assert graph.op_counts().get("BatchNormalization", 0) > 0
    canonical, applied = ENGINE.canonicalize(graph, CANONICAL_RULES)
    assert applied and "BatchNormalization" not in canonical.op_counts()
    assert verify_models(model, to_model(canonical, fold_constants=True)).ok


def test_prepare_for_search_folds_the_new_constants_into_initializers():
    from xrlflow.engine import prepare_for_search
    from xrlflow.onnx_io import to_model
    from xrlflow.rules import CANONICAL_RULES
    from xrlflow.verify import verify_models
    from xrlflow.zoo import export_model

    model = export_model("resnet50", small=True)
    graph = load_graph(model)
    prepared = prepare_for_search(graph, ENGINE, CANONICAL_RULES)
    counts = prepared.op_counts()
    assert "BatchNormalization" not in counts and "Sqrt" not in counts and "Cast" not in counts
    assert len(prepared) < len(graph)
    assert verify_models(model, to_model(prepared)).ok
