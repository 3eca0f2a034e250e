"""Small models as different exporters write them (shared by the opset-upgrade and corpus tests)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _torch_cnn():
    import torch

    class SmallCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(16)
            self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.conv3 = torch.nn.Conv2d(16, 16, 1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.conv2(y)) + torch.relu(self.conv3(y))
            y = torch.nn.functional.max_pool2d(y, 2)
            y = torch.nn.functional.interpolate(y, scale_factor=2.0, mode="nearest")
            return self.fc(y.mean(dim=(2, 3))).softmax(-1)

    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding it is not an identity
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model, (torch.randn(1, 3, 16, 16),)


def _torch_transformer_block():
    import torch

    class Block(torch.nn.Module):
        def __init__(self, dim: int = 32, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.norm1 = torch.nn.LayerNorm(dim)
            self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
            self.proj = torch.nn.Linear(dim, dim)
            self.norm2 = torch.nn.LayerNorm(dim)
            self.up = torch.nn.Linear(dim, 4 * dim)
            self.down = torch.nn.Linear(4 * dim, dim)

        def forward(self, x):
            b, t, d = x.shape
            h = self.norm1(x)

            def split(z):
                return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            att = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).softmax(-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))

    torch.manual_seed(0)
    return Block().eval(), (torch.randn(1, 8, 32),)


def _legacy_export(module, args, opset: int) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def legacy_cnn(opset: int) -> onnx.ModelProto:
    """The TorchScript (legacy) exporter's CNN at `opset` (9 writes Upsample, 11 writes Resize)."""
    return _legacy_export(*_torch_cnn(), opset)


def legacy_transformer_block(opset: int = 12) -> onnx.ModelProto:
    return _legacy_export(*_torch_transformer_block(), opset)


def dynamo_cnn() -> onnx.ModelProto:
    """torch.onnx's default (dynamo) exporter: opset 18+, weights folded into initializers."""
    import torch

    module, args = _torch_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, verbose=False)
    return program.model_proto


def keras_style_nhwc(opset: int = 13) -> onnx.ModelProto:
    """The layout tf2onnx writes for a Keras CNN: NHWC input, Transpose to NCHW around each conv block,
    BatchNormalization and Relu, then Transpose back, GlobalAveragePool and a MatMul+Add classifier."""
    rng = np.random.default_rng(0)

    def const(name: str, shape, scale: float = 0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        const("conv1_w", (8, 3, 3, 3)), const("conv1_b", (8,)),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_scale"), const("bn_bias", (8,)),
        const("bn_mean", (8,)), numpy_helper.from_array(rng.uniform(0.5, 2.0, 8).astype(np.float32), "bn_var"),
        const("conv2_w", (8, 8, 3, 3)), const("conv2_b", (8,)),
        const("dense_w", (8, 5)), const("dense_b", (5,)),
        numpy_helper.from_array(np.array([1, 8], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2], name="conv2d/Conv2D__6"),
        helper.make_node("Conv", ["nchw", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv2d/Conv2D"),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"],
                         epsilon=1e-3, name="batch_normalization/FusedBatchNormV3"),
        helper.make_node("Relu", ["bn"], ["r1"], name="re_lu/Relu"),
        helper.make_node("Transpose", ["r1"], ["r1_nhwc"], perm=[0, 2, 3, 1], name="re_lu/Relu__12"),
        helper.make_node("Transpose", ["r1_nhwc"], ["r1_nchw"], perm=[0, 3, 1, 2], name="conv2d_1/Conv2D__15"),
        helper.make_node("Conv", ["r1_nchw", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1], name="conv2d_1/Conv2D"),
        helper.make_node("Relu", ["c2"], ["r2"], name="re_lu_1/Relu"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="global_average_pooling2d/Mean"),
        helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "dense_w"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense_b"], ["logits"], name="dense/BiasAdd"),
        helper.make_node("Softmax", ["logits"], ["dense"], axis=-1, name="dense/Softmax"),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__20", 16, 16, 3])],
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__21", 5])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx")
    onnx.checker.check_model(model)
    return model


def scan_8_with_sequence_lens() -> onnx.ModelProto:
    """A valid opset-8 Scan with a sequence_lens input: onnx.version_converter's scan_8_9 adapter refuses it
    (opset 9 dropped sequence_lens and the converter cannot rewrite the loop)."""
    body = helper.make_graph(
        [helper.make_node("Add", ["state_in", "x_t"], ["state_out"]), helper.make_node("Identity", ["state_out"], ["y_t"])],
        "body",
        [helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [4])],
    )
    scan = helper.make_node("Scan", ["lens", "init", "xs"], ["final", "ys"], body=body, num_scan_inputs=1)
    graph = helper.make_graph(
        [scan], "scan8",
        [helper.make_tensor_value_info("lens", TensorProto.INT64, [2]), helper.make_tensor_value_info("init", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("xs", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("final", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("ys", TensorProto.FLOAT, [2, 3, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path
