"""Property: any sequence of offered rewrites keeps the model valid and computing the same outputs.

Random small graphs (tests/graphgen.py), up to 6 engine matches picked by hypothesis-drawn indices, exported
with and without constant folding, checked with onnx's full checker and against the original in onnxruntime
(rtol 1e-4, atol 1e-4). Also: every offered match applies without raising, and structural_hash does not
change when the exported model's nodes are renamed and reordered. XRLFLOW_PROPERTY_EXAMPLES sets the number
of examples (default 60); bench/property_long.py runs the long version. A deterministic companion applies
every match offered on the first generated graphs alone. Checked by mutation: an untranspose-matmul that
drops its output Transpose on square products, and a fold-batchnorm-into-conv that ignores epsilon, both fail
here.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.graphgen import check_export, check_sequence, random_model, shuffled_copy
from xrlflow.onnx_io import load_graph
from xrlflow.rules import default_engine
from xrlflow.verify import random_inputs, run_model

ENGINE = default_engine()
EXAMPLES = int(os.environ.get("XRLFLOW_PROPERTY_EXAMPLES", "60"))
ONE_STEP_SEEDS = 40


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)
@given(seed=st.integers(0, 2**31 - 1), picks=st.lists(st.integers(0, 2**16), min_size=1, max_size=6))
def test_random_rewrite_sequences_preserve_the_model(seed, picks):
    model = random_model(seed)
    outcome = check_sequence(ENGINE, model, picks, seed)
    sequence = [f"{m.rule} {m.nodes}" for m in outcome.applied]
    assert outcome.failure is None, f"seed {seed} picks {picks}: {outcome.failure}; sequence {sequence}"


def test_every_offered_rewrite_preserves_generated_models():
    """Deterministic companion of the random sequences: every match offered on the first generated graphs,
    applied alone, keeps the function (a rule that is wrong only on some instances, such as square products
    or a non-default epsilon, is caught here whenever the generator draws one)."""
    for seed in range(ONE_STEP_SEEDS):
        model = random_model(seed)
        graph = load_graph(model)
        feeds = random_inputs(model, seed=seed)
        expected = run_model(model, feeds)
        for match in ENGINE.matches(graph):
            failure = check_export(model, ENGINE.apply(graph, match), feeds, expected)
            assert failure is None, f"seed {seed}: {match.rule} {match.nodes}: {failure}"


def test_generator_exercises_many_rules():
    matched: set[str] = set()
    for seed in range(80):
        matched.update(m.rule for m in ENGINE.matches(load_graph(random_model(seed))))
    mine = {
        "merge-parallel-matmul", "hoist-unary-above-split", "hoist-unary-over-concat", "cancel-split-concat",
        "cancel-concat-split", "cancel-slice-concat", "hoist-const-binary-over-concat", "sink-unary-into-concat",
    }
    layout = {
        "split-transpose", "compose-transposes", "move-transpose-before-split", "untranspose-gemm",
        "extract-transpose-from-gemm", "move-transpose-before-reshape", "move-transpose-after-const-binary",
        "move-transpose-before-const-binary", "move-scale-into-matmul", "untranspose-matmul",
        "fold-batchnorm-into-conv", "matmul-add-to-gemm",
    }
    assert mine | layout <= matched, sorted((mine | layout) - matched)
    assert len(matched) >= 24, sorted(matched)


def test_generator_draws_the_instances_weak_rules_pass_on():
    """Square transposed products (a rule dropping a Transpose there keeps the shape), permutations that are
    not their own inverse, and BatchNorm epsilons far from the default."""
    square = non_self_inverse = epsilons = 0
    for seed in range(60):
        graph = load_graph(random_model(seed))
        for node in graph.nodes.values():
            if node.op_type == "Transpose" and graph.static_shape(node.inputs[0]):
                shape = graph.static_shape(node.inputs[0])
                perm = tuple(node.attr("perm") or reversed(range(len(shape))))
                non_self_inverse += tuple(perm[p] for p in perm) != tuple(range(len(perm)))
                square += node.op_type == "Transpose" and len(set(shape[-2:])) == 1 and len(shape) >= 2
            if node.op_type == "BatchNormalization":
                epsilons += node.attr("epsilon", 1e-5) > 1e-3
    assert square >= 5 and non_self_inverse >= 10 and epsilons >= 5, (square, non_self_inverse, epsilons)


def test_shuffled_copy_renames_and_reorders():
    from xrlflow.onnx_io import to_model

    exported = to_model(load_graph(random_model(3)))
    shuffled = shuffled_copy(exported, 3)
    assert not {n.name for n in shuffled.graph.node} & {n.name for n in exported.graph.node}
    assert [o.name for o in shuffled.graph.output] == [o.name for o in exported.graph.output]
    assert load_graph(shuffled).structural_hash() == load_graph(exported).structural_hash()
