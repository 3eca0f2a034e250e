"""A small corpus of models as different exporters write them, each through the CLI the way a user runs it:
it optimises and verifies (exit 0, the output computes what the original file computes), or it gets one clear
line and exit 2 with nothing written. Never a traceback."""

from __future__ import annotations

import re
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import exporters


@dataclass(frozen=True)
class Case:
    build: Callable[[], onnx.ModelProto]
    flags: tuple[str, ...] = ()
    exit_code: int = 0
    error: str = ""  # for exit 2: the start of the one line after "xrlflow: error: "
    feed_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # for symbolic inputs


CORPUS = {
    "torch-dynamo-cnn": Case(exporters.dynamo_cnn),
    "torchscript-opset11-cnn": Case(lambda: exporters.legacy_cnn(11)),
    "torchscript-opset11-transformer-block": Case(lambda: exporters.legacy_transformer_block(11)),
    "torchscript-opset9-cnn": Case(lambda: exporters.legacy_cnn(9)),
    "keras-nhwc": Case(exporters.keras_style_nhwc, ("--input-shape", "input_1=1x16x16x3"), feed_shapes={"input_1": (1, 16, 16, 3)}),
    "keras-nhwc-opset11": Case(lambda: exporters.keras_style_nhwc(11), ("--input-shape", "input_1=1x16x16x3"),
                               feed_shapes={"input_1": (1, 16, 16, 3)}),
    "keras-nhwc-unbound-batch": Case(exporters.keras_style_nhwc, exit_code=2, error="unbound symbolic dims input_1[0]=unk__20"),
    "opset8-scan-the-converter-refuses": Case(exporters.scan_8_with_sequence_lens, exit_code=2,
                                              error="opset 8 could not be upgraded to 13 by onnx.version_converter"),
}


def _feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    init = {t.name for t in model.graph.initializer}
    return {
        v.name: rng.standard_normal(shapes.get(v.name) or [d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
        for v in model.graph.input if v.name not in init
    }


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_model_optimises_and_verifies_or_gets_one_line(name, tmp_path):
    case = CORPUS[name]
    original = case.build()
    source = exporters.save(original, tmp_path / f"{name}.onnx")
    output = tmp_path / f"{name}.opt.onnx"
    before = _snapshot(tmp_path)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "xrlflow.cli", "optimize", str(source), "-o", str(output), "--search", "greedy",
         "--latency", "cost", "--no-progress", *case.flags],
        capture_output=True, text=True, timeout=120, env={**os.environ, "XRLFLOW_DEBUG": ""},
    )
    assert time.perf_counter() - started < 30
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == case.exit_code, result.stderr
    if case.exit_code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"xrlflow: error: {case.error}"), result.stderr
        assert result.stdout == "" and _snapshot(tmp_path) == before  # nothing written, input unchanged
        return
    assert re.search(r"verification\s+passed", result.stdout)
    assert source.read_bytes() == before[source.name]
    optimised = onnx.load(str(output))
    onnx.checker.check_model(optimised, full_check=True)
    assert [i.name for i in optimised.graph.input] == [i.name for i in original.graph.input if i.name not in
                                                       {t.name for t in original.graph.initializer}]
    assert [o.name for o in optimised.graph.output] == [o.name for o in original.graph.output]
    feeds = _feeds(original, case.feed_shapes)
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, feeds)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_corpus_spans_the_exporters():
    assert len(CORPUS) >= 6
    assert sum(c.exit_code == 0 for c in CORPUS.values()) >= 5
