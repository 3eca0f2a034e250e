"""The IR: loading, constness, hashing, graphs as values, export and bad input."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.rulecheck import ENGINE, ModelBuilder, matches_of
from xrlflow.errors import BadInputError
from xrlflow.graph_edit import GraphEdit
from xrlflow.onnx_io import load_graph, save_model, to_model
from xrlflow.verify import verify_models


def _qkv_model(seed=0, identity_alias=False):
    b = ModelBuilder(seed)
    x = b.input("x", [2, 8])
    w = b.const((8, 4))
    if identity_alias:
        w2 = b.op("Identity", [w])
    else:
        w2 = b.const((8, 4))
    q = b.op("MatMul", [x, w])
    k = b.op("MatMul", [x, w2])
    v = b.op("MatMul", [x, b.const((8, 4))])
    b.output(b.op("Add", [b.op("Add", [q, k]), v]))
    return b.model()


def _renamed_and_permuted(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    order = list(range(len(nodes)))
    rng = np.random.default_rng(1)
    # a permutation that keeps the topological order valid is not needed: the IR sorts itself
    rng.shuffle(order)
    del m.graph.node[:]
    for i in order:
        n = nodes[i]
        n.name = f"renamed_{i}"
        m.graph.node.append(n)
    # rename an intermediate value consistently
    inter = nodes[0].output[0]
    for n in m.graph.node:
        for j, v in enumerate(n.input):
            if v == inter:
                n.input[j] = "renamed_value"
        for j, v in enumerate(n.output):
            if v == inter:
                n.output[j] = "renamed_value"
    return m


def test_hash_ignores_node_names_order_and_intermediate_names():
    model = _qkv_model()
    assert load_graph(model).structural_hash() == load_graph(_renamed_and_permuted(model)).structural_hash()


def test_hash_sees_op_attribute_shape_and_edge_changes():
    base = load_graph(_qkv_model()).structural_hash()
    # attribute
    b = ModelBuilder(0)
    x = b.input("x", [2, 8])
    b.output(b.op("Softmax", [x], axis=1))
    h1 = load_graph(b.model()).structural_hash()
    b = ModelBuilder(0)
    x = b.input("x", [2, 8])
    b.output(b.op("Softmax", [x], axis=0))
    assert load_graph(b.model()).structural_hash() != h1
    # shape
    b = ModelBuilder(0)
    x = b.input("x", [3, 8])
    b.output(b.op("Softmax", [x], axis=1))
    assert load_graph(b.model()).structural_hash() != h1
    # op
    b = ModelBuilder(0)
    x = b.input("x", [2, 8])
    b.output(b.op("Relu", [x]))
    assert load_graph(b.model()).structural_hash() != h1
    # edge: swap which weight feeds which MatMul
    m = _qkv_model()
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    mm[0].input[1], mm[2].input[1] = mm[2].input[1], mm[0].input[1]
    assert load_graph(m).structural_hash() != base


def test_constness_sees_through_identity_and_constant_nodes():
    model = _qkv_model(identity_alias=True)
    g = load_graph(model)
    ident = g.by_op("Identity")[0]
    assert g.is_constant(ident.outputs[0])
    assert g.constant_source(ident.outputs[0]) == ident.inputs[0]
    assert not g.is_constant("x")
    # the aliased weight still merges
    assert matches_of(g, "merge-parallel-matmul")
    b = ModelBuilder(0)
    x = b.input("x", [2, 3])
    c = b.op("Constant", [], value=numpy_helper.from_array(np.ones((3, 2), np.float32)))
    b.output(b.op("MatMul", [x, c]))
    g = load_graph(b.model())
    assert g.is_constant(c)
    assert g.constant_array(c).shape == (3, 2)


def test_graphs_are_values():
    g = load_graph(_qkv_model())
    before = to_model(g).SerializeToString()
    h = g.structural_hash()
    (m,) = matches_of(g, "merge-parallel-matmul")
    new = ENGINE.apply(g, m)
    assert to_model(g).SerializeToString() == before
    assert g.structural_hash() == h
    assert new.structural_hash() != h
    assert len(g.by_op("MatMul")) == 3 and len(new.by_op("MatMul")) == 1
    # nodes are shared, not copied
    shared = set(g.nodes) & set(new.nodes)
    assert shared and all(g.nodes[n] is new.nodes[n] for n in shared if g.nodes[n] == new.nodes[n])


def test_export_folds_rewrite_constants_without_duplicating_weights():
    model = _qkv_model()
    g = load_graph(model)
    new = ENGINE.apply(g, matches_of(g, "merge-parallel-matmul")[0])
    folded = to_model(new, fold_constants=True)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node].count("Concat") == 0
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in folded.graph.initializer)
    orig_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert weight_bytes <= orig_bytes + 64  # the merged weight replaces the three originals (+ split sizes)
    assert verify_models(model, folded).ok
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]


def test_external_data_model_loads_and_saves(tmp_path):
    model = _qkv_model()
    path = tmp_path / "ext.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # onnx.save_model moves the weights of the proto it is given out to the file
    onnx.save_model(on_disk, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    g = load_graph(path)
    assert len(g.initializers) == 3
    out = tmp_path / "out.onnx"
    save_model(to_model(g), out, external_data=True)
    assert (tmp_path / "out.onnx.data").exists()
    assert verify_models(model, onnx.load(str(out))).ok
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_opaque_nodes_are_kept_and_subgraph_reads_survive():
    # custom-domain op + a Loop whose body reads an outer value produced by a rewritable MatMul pair
    b = ModelBuilder(3)
    x = b.input("x", [2, 4])
    w1, w2 = b.const((4, 4)), b.const((4, 4))
    y1 = b.op("MatMul", [x, w1])
    y2 = b.op("MatMul", [x, w2])
    body = helper.make_graph(
        [helper.make_node("Add", ["carry", y1], ["carry_out"]), helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carry", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("carry_out", TensorProto.FLOAT, [2, 4])],
    )
    trip = b.const((), dtype=np.int64, value=3)
    cond = b.const((), dtype=bool, value=True)
    loop_out = b.op("Loop", [trip, cond, y2], body=body)
    b.output(loop_out)
    model = b.model()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(loop_out, TensorProto.FLOAT, [2, 4]))
    g = load_graph(model)
    loop = g.by_op("Loop")[0]
    assert loop.is_opaque and y1 in loop.implicit_inputs
    for m in matches_of(g, "merge-parallel-matmul"):
        new = ENGINE.apply(g, m)
        exported = to_model(new, fold_constants=True)
        onnx.checker.check_model(exported, full_check=True)
        assert verify_models(model, exported).ok
        assert y1 in new.types  # the value the Loop body reads kept its name


@pytest.mark.parametrize("case", ["not_onnx", "truncated", "missing_data", "old_opset_unconvertible", "unbound_dims", "cycle", "dangling"])
def test_bad_input_gets_one_line_error_and_exit_2(tmp_path, case):
    path = tmp_path / "model.onnx"
    model = _qkv_model()
    if case == "not_onnx":
        path.write_text("this is not a model")
    elif case == "truncated":
        path.write_bytes(model.SerializeToString()[:57])
    elif case == "missing_data":
        onnx.save_model(model, str(path), save_as_external_data=True, location="w.data", size_threshold=0)
        os.unlink(tmp_path / "w.data")
    elif case == "old_opset_unconvertible":  # older opsets are upgraded; this one onnx.version_converter refuses
        from tests.exporters import scan_8_with_sequence_lens

        onnx.save(scan_8_with_sequence_lens(), str(path))
    elif case == "unbound_dims":
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
        onnx.save(model, str(path))
    elif case == "cycle":
        n0, n1 = model.graph.node[0], model.graph.node[3]
        n0.input[0] = n1.output[0]
        onnx.save(model, str(path))
    elif case == "dangling":
        model.graph.node[0].input[0] = "nobody_makes_this"
        onnx.save(model, str(path))
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "xrlflow.cli", "rules", "--model", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xrlflow: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.read_bytes() == before


def test_bound_symbolic_dims(tmp_path):
    model = _qkv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(BadInputError, match="batch"):
        load_graph(model)
    g = load_graph(model, {"x": (5, 8)})
    assert g.static_shape("x") == (5, 8)
    # the export keeps the model's own symbolic declaration
    assert to_model(g).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_bound_dims_are_tracked_through_rewrites():
    model = _qkv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    g = load_graph(model, {"x": (5, 8)})
    assert g.dim_is_bound("x", 0) and not g.dim_is_bound("x", 1)
    mm = g.by_op("MatMul")[0]
    assert g.dim_is_bound(mm.outputs[0], 0) and not g.dim_is_bound(mm.outputs[0], 1)
    new = ENGINE.apply(g, matches_of(g, "merge-parallel-matmul")[0])
    merged = new.by_op("MatMul")[0]
    assert new.dim_is_bound(merged.outputs[0], 0)  # derived from a bound value: conservative on every axis
    static = load_graph(_qkv_model())
    assert not static.dim_is_bound("x", 0)


def test_an_edit_that_leaves_a_dangling_read_fails_at_commit():
    from xrlflow.errors import GraphError
    from xrlflow.ir import TensorType

    g = load_graph(_qkv_model())
    e = GraphEdit(g, "broken-rule")
    out = g.by_op("Add")[-1].outputs[0]
    e.replace_value(out, e.add1("Relu", ["no_such_value"], TensorType(1, (2, 4))))
    with pytest.raises(GraphError, match="nothing produces"):
        e.commit()
