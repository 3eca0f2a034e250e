"""ONNX import and export for the IR (`load_graph`, `to_model`, `save_model`): the entry point the rest of
xrlflow imports from. Import (reading, validation, shape binding, external data) is onnx_import.py, the
opset upgrade opset_upgrade.py, export (constant folding, atomic save, payload sizes) onnx_export.py."""

from xrlflow.errors import GraphError
from xrlflow.ir import make_attributes, tensor_array
from xrlflow.onnx_export import (
    CONTRIB_OPSET_VERSIONS, NEVER_FOLD, PROTOBUF_SAFE_BYTES, fits_in_protobuf, graph_to_bytes, has_external_data,
    payload_bytes, save_model, to_model, weight_bytes, write_with_external_data,
)
from xrlflow.onnx_import import (
    KEEP_EXTERNAL_BYTES, check_model_file, check_tensor_payload, load_graph, parse_input_shapes, read_model,
)
from xrlflow.opset_upgrade import MIN_OPSET, default_opset, opset_upgrade_note, upgrade_opset

__all__ = ["load_graph", "upgrade_opset", "opset_upgrade_note", "MIN_OPSET", "read_model", "to_model", "save_model",
           "tensor_array", "weight_bytes", "fits_in_protobuf", "parse_input_shapes", "graph_to_bytes", "GraphError",
           "make_attributes", "check_model_file", "write_with_external_data", "payload_bytes", "has_external_data",
           "check_tensor_payload", "default_opset", "CONTRIB_OPSET_VERSIONS", "NEVER_FOLD", "PROTOBUF_SAFE_BYTES",
           "KEEP_EXTERNAL_BYTES"]
