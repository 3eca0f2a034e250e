"""Random small ONNX graphs on which many rewrite rules match, and the property checked on rewrite sequences.

`random_model` mixes MatMuls that share an input (constant weights, optional bias Add), small Convs that share
an input (1x1 and 3x3 siblings, BatchNorms with varied epsilon), Relu/Sigmoid, Adds of branches,
Concat/Split/Slice, and transpose algebra (non-self-inverse permutations, square products, Gemm flags, head
splits, scaled scores). `check_sequence` applies
engine matches picked by a list of integers, exports the result (with and without constant folding) and
checks it against the original; the hypothesis test and bench/property_long.py share it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import onnx

from tests.rulecheck import ModelBuilder
from xrlflow.engine import Match, RewriteEngine
from xrlflow.ir import Graph
from xrlflow.onnx_io import load_graph, to_model
from xrlflow.verify import Tolerance, compare_outputs, random_inputs, run_model

PROPERTY_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-4)
ACTIVATIONS = ("Relu", "Sigmoid")
BATCHNORM_EPSILONS = (1e-5, 0.05, 0.5, 2.0)
# per rank: permutations that are not their own inverse, and self-inverse ones (the swap-only rules want those)
CYCLES = {2: ((1, 0),), 3: ((1, 2, 0), (2, 0, 1)), 4: ((0, 2, 3, 1), (0, 3, 1, 2), (1, 2, 3, 0), (2, 0, 3, 1))}
SWAPS = {2: ((1, 0),), 3: ((0, 2, 1), (1, 0, 2)), 4: ((0, 2, 1, 3), (0, 1, 3, 2))}


@dataclass(frozen=True)
class GraphGenConfig:
    min_blocks: int = 2
    max_blocks: int = 7
    max_width: int = 4  # MatMul output widths and Conv channel counts are drawn from 2..max_width
    extra_output_probability: float = 0.15  # an intermediate value also made a graph output


@dataclass
class _Value:
    name: str
    shape: tuple[int, ...]


class _Builder:
    """Grows a random graph block by block from a pool of float values."""

    def __init__(self, seed: int, config: GraphGenConfig) -> None:
        # opset 18 Splits may give num_outputs instead of sizes: both forms reach the rules
        self.b = ModelBuilder(seed, opset=18 if seed % 3 == 0 else 17)
        self.rng = self.b.rng
        self.config = config
        self.pool: list[_Value] = []
        self.read: set[str] = set()
        self.extra_outputs: list[str] = []

    # ---- helpers --------------------------------------------------------------------------------------------
    def choice(self, items):
        return items[int(self.rng.integers(0, len(items)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def width(self) -> int:
        return int(self.rng.integers(2, self.config.max_width + 1))

    def use(self, v: _Value) -> str:
        self.read.add(v.name)
        return v.name

    def emit(self, name: str, shape: tuple[int, ...]) -> _Value:
        value = _Value(name, tuple(shape))
        self.pool.append(value)
        if self.chance(self.config.extra_output_probability):
            self.extra_outputs.append(name)
        return value

    def activation(self, v: _Value, op: str | None) -> _Value:
        return v if op is None else self.emit(self.b.op(op, [self.use(v)]), v.shape)

    def maybe_activation(self) -> str | None:
        return self.choice(ACTIVATIONS) if self.chance(0.7) else None

    def ints(self, values) -> str:
        return self.b.const(None, dtype=np.int64, value=list(values))

    def of_rank(self, ranks) -> list[_Value]:
        return [v for v in self.pool if len(v.shape) in ranks]

    # ---- blocks ---------------------------------------------------------------------------------------------
    def matmul_group(self) -> None:
        candidates = [v for v in self.of_rank((2, 3))]
        if not candidates:
            return
        x = self.choice(candidates)
        k = x.shape[-1]
        act = self.maybe_activation()
        bias = self.chance(0.6)
        shared_weight = None
        for _ in range(int(self.rng.integers(2, 4))):
            w = self.width()
            if shared_weight is not None and self.chance(0.2):
                weight, w = shared_weight
            else:
                weight = self.b.const((k, w), scale=0.5)
                shared_weight = (weight, w)
            y = self.b.op("MatMul", [self.use(x), weight])
            if bias:
                y = self.b.op("Add", [y, self.b.const((w,))])
            self.activation(self.emit(y, x.shape[:-1] + (w,)), act)

    def conv_group(self) -> None:
        candidates = self.of_rank((4,))
        if not candidates:
            return
        x = self.choice(candidates)
        c = x.shape[1]
        act = self.maybe_activation()
        out_channels = self.width()
        for _ in range(int(self.rng.integers(2, 4))):
            kernel = self.choice((1, 3))
            m = out_channels if self.chance(0.5) else self.width()
            inputs = [self.use(x), self.b.const((m, c, kernel, kernel), scale=0.3)]
            if self.chance(0.7):
                inputs.append(self.b.const((m,)))
            pad = kernel // 2
            y = self.b.op("Conv", inputs, kernel_shape=[kernel, kernel], pads=[pad] * 4)
            if self.chance(0.25):  # an export that kept its BatchNorm
                variance = np.abs(self.rng.standard_normal(m)).astype(np.float32) + 0.5
                stats = [self.b.const((m,)), self.b.const((m,)), self.b.const((m,)), self.b.const(None, value=variance)]
                epsilon = float(self.choice(BATCHNORM_EPSILONS))  # a rule that ignores epsilon must fail
                y = self.b.op("BatchNormalization", [y] + stats, epsilon=epsilon)
            shape = (x.shape[0], m) + x.shape[2:]
            self.activation(self.emit(y, shape), act)

    def branch_add(self) -> None:
        by_shape: dict[tuple[int, ...], list[_Value]] = {}
        for v in self.pool:
            by_shape.setdefault(v.shape, []).append(v)
        pairs = [vs for vs in by_shape.values() if len(vs) >= 2]
        if not pairs:
            return
        group = self.choice(pairs)
        i, j = self.rng.choice(len(group), size=2, replace=False)
        a, b = group[int(i)], group[int(j)]
        self.activation(self.emit(self.b.op("Add", [self.use(a), self.use(b)]), a.shape), self.maybe_activation())

    def split(self) -> None:
        candidates = [v for v in self.pool if any(d >= 2 for d in v.shape)]
        if not candidates:
            return
        x = self.choice(candidates)
        axis = self.choice([i for i, d in enumerate(x.shape) if d >= 2])
        total = x.shape[axis]
        n = int(self.rng.integers(2, min(total, 3) + 1))
        cuts = sorted(int(c) for c in self.rng.choice(np.arange(1, total), size=n - 1, replace=False))
        sizes = [e - s for s, e in zip([0] + cuts, cuts + [total])]
        outs = self.b.op("Split", [self.use(x), self.ints(sizes)], n_out=n, axis=axis - len(x.shape) * int(self.chance(0.3)))
        act = self.maybe_activation()
        binary = self.choice(("Add", "Mul")) if self.chance(0.4) else None
        for out, size in zip(outs, sizes):
            shape = x.shape[:axis] + (size,) + x.shape[axis + 1:]
            piece = self.emit(out, shape)
            if binary:
                c_shape = shape[axis:] if self.chance(0.5) else shape
                piece = self.emit(self.b.op(binary, [self.use(piece), self.b.const(c_shape)]), shape)
            self.activation(piece, act)

    def concat(self) -> None:
        if not self.pool:
            return
        first = self.choice(self.pool)
        axis = int(self.rng.integers(0, len(first.shape)))
        mates = [
            v for v in self.pool
            if len(v.shape) == len(first.shape) and all(d == e for i, (d, e) in enumerate(zip(v.shape, first.shape)) if i != axis)
        ]
        n = int(self.rng.integers(2, 4))
        members = [self.choice(mates) for _ in range(n)]
        act = self.choice(ACTIVATIONS) if self.chance(0.4) else None
        scale = self.chance(0.3)
        names = []
        for v in members:
            name = self.use(v)
            if act:
                name = self.b.op(act, [name])
            if scale:
                c_shape = v.shape[axis:]
                name = self.b.op("Mul", [name, self.b.const(c_shape)])
            names.append(name)
        shape = list(first.shape)
        shape[axis] = sum(v.shape[axis] for v in members)
        joined = self.emit(self.b.op("Concat", names, axis=axis), tuple(shape))
        roll = self.rng.random()
        if roll < 0.3:  # cut the inputs back out: cancel-concat-split
            sizes = [v.shape[axis] for v in members]
            outs = self.b.op("Split", [self.use(joined), self.ints(sizes)], n_out=len(sizes), axis=axis)
            for out, v in zip(outs, members):
                self.emit(out, v.shape)
        elif roll < 0.5:  # slice one input back out: cancel-slice-concat
            pick = int(self.rng.integers(0, len(members)))
            start = sum(v.shape[axis] for v in members[:pick])
            sliced = self.b.op("Slice", [
                self.use(joined), self.ints([start]), self.ints([start + members[pick].shape[axis]]), self.ints([axis]),
            ])
            self.emit(sliced, members[pick].shape)
        else:
            self.activation(joined, self.maybe_activation())

    def split_concat(self) -> None:
        """A Split whose pieces are (optionally activated and) concatenated back: cancel/hoist material."""
        candidates = [v for v in self.pool if any(d >= 2 for d in v.shape)]
        if not candidates:
            return
        x = self.choice(candidates)
        axis = self.choice([i for i, d in enumerate(x.shape) if d >= 2])
        half = x.shape[axis] // 2
        sizes = [half, x.shape[axis] - half]
        if self.b.opset >= 18 and sizes[0] == sizes[1]:
            outs = self.b.op("Split", [self.use(x)], n_out=2, axis=axis, num_outputs=2)
        else:
            outs = self.b.op("Split", [self.use(x), self.ints(sizes)], n_out=2, axis=axis)
        act = self.choice(ACTIVATIONS) if self.chance(0.5) else None
        names = [self.b.op(act, [o]) for o in outs] if act else list(outs)
        self.emit(self.b.op("Concat", names, axis=axis), x.shape)

    def algebra(self) -> None:
        """MatMul/Add/Mul/Transpose patterns: X@A + X@B, (X@A)@B, constant chains, scaled and transposed MatMuls."""
        candidates = self.of_rank((2, 3))
        if not candidates:
            return
        x = self.choice(candidates)
        k = x.shape[-1]
        lead = x.shape[:-1]
        kind = int(self.rng.integers(0, 5))
        if kind == 0:  # X@A + X@B (+ X@C)
            w = self.width()
            total = self.b.op("MatMul", [self.use(x), self.b.const((k, w), scale=0.5)])
            for _ in range(int(self.rng.integers(1, 3))):
                total = self.b.op("Add", [total, self.b.op("MatMul", [x.name, self.b.const((k, w), scale=0.5)])])
            self.emit(total, lead + (w,))
        elif kind == 1:  # (X@A)@B, optionally scaled by a constant scalar
            w1, w2 = self.width(), self.width()
            y = self.b.op("MatMul", [self.use(x), self.b.const((k, w1), scale=0.5)])
            y = self.b.op("MatMul", [y, self.b.const((w1, w2), scale=0.5)])
            if self.chance(0.5):
                y = self.b.op("Mul", [y, self.b.const((), value=np.float32(0.5))])
            self.emit(y, lead + (w2,))
        elif kind == 2:  # (X op c1) op c2
            op = self.choice(("Add", "Mul"))
            y = self.b.op(op, [self.use(x), self.b.const((k,))])
            self.emit(self.b.op(op, [y, self.b.const((k,))]), x.shape)
        elif kind == 3:  # X*c1 + X*c2
            y = self.b.op("Add", [
                self.b.op("Mul", [self.use(x), self.b.const((k,))]), self.b.op("Mul", [x.name, self.b.const((k,))]),
            ])
            self.emit(y, x.shape)
        else:  # Transpose(act(X@A)) over the last two axes; square products half the time
            w = lead[-1] if lead[-1] >= 2 and self.chance(0.5) else self.width()
            y = self.b.op("MatMul", [self.use(x), self.b.const((k, w), scale=0.5)])
            act = self.maybe_activation()
            if act:
                y = self.b.op(act, [y])
            perm = list(range(len(lead) - 1)) + [len(lead), len(lead) - 1]
            self.emit(self.b.op("Transpose", [y], perm=perm), lead[:-1] + (w, lead[-1]))

    def shared_weight(self) -> None:
        """One constant weight used by MatMuls (or Convs) on two different values of one shape."""
        by_shape: dict[tuple[int, ...], list[_Value]] = {}
        for v in self.pool:
            if len(v.shape) in (2, 3, 4):
                by_shape.setdefault(v.shape, []).append(v)
        groups = [vs for vs in by_shape.values() if len(vs) >= 2]
        if not groups:
            return
        group = self.choice(groups)
        i, j = self.rng.choice(len(group), size=2, replace=False)
        pair = (group[int(i)], group[int(j)])
        shape = pair[0].shape
        if len(shape) == 4:
            m = self.width()
            weight = self.b.const((m, shape[1], 1, 1), scale=0.3)
            for v in pair:
                self.emit(self.b.op("Conv", [self.use(v), weight], kernel_shape=[1, 1]), (shape[0], m) + shape[2:])
        else:
            w = self.width()
            weight = self.b.const((shape[-1], w), scale=0.5)
            for v in pair:
                self.emit(self.b.op("MatMul", [self.use(v), weight]), shape[:-1] + (w,))

    def conv_sum(self) -> None:
        """Add(Conv(x, W1, b1), Conv(x, W2, b2)) with one kernel shape."""
        candidates = self.of_rank((4,))
        if not candidates:
            return
        x = self.choice(candidates)
        m, kernel = self.width(), self.choice((1, 3))
        convs = [
            self.b.op("Conv", [self.use(x), self.b.const((m, x.shape[1], kernel, kernel), scale=0.3), self.b.const((m,))],
                      kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4)
            for _ in range(2)
        ]
        self.activation(self.emit(self.b.op("Add", convs), (x.shape[0], m) + x.shape[2:]), self.maybe_activation())

    def perm(self, rank: int) -> list[int]:
        return list(self.choice(CYCLES[rank] if self.chance(0.7) else SWAPS[rank]))

    def transposed(self, v: _Value, perm: list[int]) -> _Value:
        return self.emit(self.b.op("Transpose", [self.use(v)], perm=perm), tuple(v.shape[p] for p in perm))

    def layout(self) -> None:
        """Transpose algebra: Transpose chains, transposed and square products, Gemm flags, head splits, moves of
        a Transpose across Split/Concat and constant binaries, scaled products of two computed values."""
        candidates = self.of_rank((2, 3))
        if not candidates:
            return
        x = self.choice(candidates)
        rank = len(x.shape)
        kind = int(self.rng.integers(0, 8))
        if kind == 0:  # Transpose(Transpose(x)), sometimes an inverse pair
            first = self.perm(rank)
            inverse = [first.index(i) for i in range(rank)]
            mid = self.transposed(x, first)
            self.transposed(mid, inverse if self.chance(0.4) else self.perm(rank))
        elif kind == 1:  # MatMul(Transpose(B), Transpose(A)) = (A@B)^T, A@B square more often than not
            m = x.shape[-1]
            n = x.shape[-2] if x.shape[-2] >= 2 and self.chance(0.6) else self.width()
            xt = self.transposed(x, list(range(rank - 2)) + [rank - 1, rank - 2])
            b = self.b.op("Transpose", [self.b.const((m, n), scale=0.5)], perm=[1, 0])
            self.emit(self.b.op("MatMul", [b, self.use(xt)]), x.shape[:-2] + (n, x.shape[-2]))
        elif kind == 2 and rank == 2:  # Gemm with flags (square half the time), maybe transposed after
            m, k = x.shape
            n = m if self.chance(0.5) else self.width()
            trans_b = int(self.chance(0.5))
            inputs = [self.use(x), self.b.const((n, k) if trans_b else (k, n), scale=0.5)]
            if self.chance(0.7):
                inputs.append(self.b.const(self.choice([(n,), (m, 1), (m, n)])))
            y = self.b.op("Gemm", inputs, transB=trans_b, alpha=float(self.choice((1.0, 0.5))))
            y = self.emit(y, (m, n))
            if self.chance(0.5):
                self.transposed(y, [1, 0])
        elif kind == 3 and x.shape[-1] >= 2:  # a head split [.., h*d] -> [.., h, d] (d may be 1), a layout perm
            heads = next(h for h in range(2, x.shape[-1] + 1) if x.shape[-1] % h == 0)
            shape = x.shape[:-1] + (heads, x.shape[-1] // heads)
            r = self.emit(self.b.op("Reshape", [self.use(x), self.ints(shape)]), shape)
            if self.chance(0.3):  # a scalar scale right after the head split
                r = self.emit(self.b.op(self.choice(("Mul", "Div")), [self.use(r), self.b.const((), value=np.float32(2.0))]), shape)
            t = self.transposed(r, self.perm(len(shape)))
            if self.chance(0.3):  # a scale on the head layout (it may move over the Reshape)
                t = self.emit(self.b.op("Mul", [self.use(t), self.b.const((), value=np.float32(0.5))]), t.shape)
            if self.chance(0.5):  # merge back the other way: Reshape(Transpose)
                merged = (int(np.prod(t.shape[:-1])), t.shape[-1])
                self.emit(self.b.op("Reshape", [self.use(t), self.ints(merged)]), merged)
        elif kind == 4:  # Split whose pieces are transposed alike, or Concat of transposed values
            perm = self.perm(rank)
            if x.shape[-1] >= 2 and self.chance(0.5):
                sizes = [1, x.shape[-1] - 1]
                outs = self.b.op("Split", [self.use(x), self.ints(sizes)], n_out=2, axis=rank - 1)
                for out, size in zip(outs, sizes):
                    self.b.op("Transpose", [out], perm=perm)
                    self.emit(self.b.nodes[-1].output[0], tuple((x.shape[:-1] + (size,))[p] for p in perm))
            else:
                t1, t2 = self.transposed(x, perm), self.transposed(x, perm)
                axis = int(self.rng.integers(0, rank))
                shape = list(t1.shape)
                shape[axis] *= 2
                self.emit(self.b.op("Concat", [self.use(t1), self.use(t2)], axis=axis), tuple(shape))
        elif kind == 5:  # bias Add / scale Mul on a transposed value, or a Transpose of one
            perm = self.perm(rank)
            op = self.choice(("Add", "Mul", "Sub"))
            if self.chance(0.5):
                t = self.transposed(x, perm)
                self.emit(self.b.op(op, [self.use(t), self.b.const(t.shape[-1:])]), t.shape)
            else:
                y = self.emit(self.b.op(op, [self.use(x), self.b.const(x.shape[-1:])]), x.shape)
                self.transposed(y, perm)
        elif kind == 6:  # attention-style scores: Mul(A @ B^T, s) with both operands computed
            xt = self.transposed(x, list(range(rank - 2)) + [rank - 1, rank - 2])
            scores = self.b.op("MatMul", [self.use(x), self.use(xt)])
            op = self.choice(("Mul", "Div"))
            scale = self.b.const((), value=np.float32(0.5 if op == "Mul" else 2.0))
            self.emit(self.b.op(op, [scores, scale]), x.shape[:-1] + (x.shape[-2],))

        elif kind == 7:  # torch's SDPA sandwich: Reshape(Transpose(Reshape(x, flat)), back) or Reshape(Reshape(x))
            flat = (int(np.prod(x.shape[:-1])), x.shape[-1])
            r = self.b.op("Reshape", [self.use(x), self.ints(flat)])
            if self.chance(0.5):
                t = self.b.op("Transpose", [r], perm=[1, 0])
                back = (x.shape[-1],) + x.shape[:-1]
                self.emit(self.b.op("Reshape", [t, self.ints(back)]), back)
            else:
                self.emit(self.b.op("Reshape", [r, self.ints(x.shape)]), x.shape)

    def model(self) -> onnx.ModelProto:
        kinds = [
            self.matmul_group, self.conv_group, self.branch_add, self.split, self.concat, self.split_concat,
            self.algebra, self.shared_weight, self.conv_sum, self.layout,
        ]
        weights = np.array([3, 3, 1.5, 1.5, 1.5, 1.0, 2.0, 1.0, 1.0, 4.0])
        for _ in range(int(self.rng.integers(self.config.min_blocks, self.config.max_blocks + 1))):
            kinds[int(self.rng.choice(len(kinds), p=weights / weights.sum()))]()
        leaves = [v.name for v in self.pool if v.name not in self.read]
        outputs = list(dict.fromkeys(leaves + self.extra_outputs))
        if not outputs:
            outputs = [self.pool[-1].name]
        self.b.output(*outputs)
        return self.b.model()


def random_model(seed: int, config: GraphGenConfig = GraphGenConfig()) -> onnx.ModelProto:
    """A random small model: a matrix input and/or an image input, then random blocks (see module doc)."""
    builder = _Builder(seed, config)
    rng = builder.rng
    with_matrix, with_image = [(True, False), (False, True), (True, True)][int(rng.integers(0, 3))]
    if with_matrix:
        lead = tuple(int(d) for d in rng.integers(1, 4, size=int(rng.integers(1, 3))))
        shape = lead + (int(rng.integers(2, 6)),)
        builder.pool.append(_Value(builder.b.input("x", shape), shape))
    if with_image:
        shape = (1, int(rng.integers(2, 5)), int(rng.integers(3, 6)), int(rng.integers(3, 6)))
        builder.pool.append(_Value(builder.b.input("img", shape), shape))
    return builder.model()


# ---- the property --------------------------------------------------------------------------------------------


@dataclass
class SequenceOutcome:
    applied: list[Match] = field(default_factory=list)
    offered: dict[str, int] = field(default_factory=dict)  # per rule: offered matches applied to check none raises
    failure: str | None = None  # None when every check passed
    failed_step: int | None = None  # steps applied before the failure was seen (for minimisation)


def apply_picks(engine: RewriteEngine, graph: Graph, picks: list[int], outcome: SequenceOutcome) -> Graph | None:
    """Apply matches chosen by `picks` (index modulo the number of matches); every offered match must apply."""
    for step, pick in enumerate(picks):
        matches = engine.matches(graph)
        if not matches:
            break
        for m in matches:
            try:
                engine.apply(graph, m)
            except Exception as exc:  # any exception is a finding
                outcome.failure = f"offered match {m.rule} {m.nodes} raised {type(exc).__name__}: {exc}"
                outcome.failed_step = step
                outcome.applied.append(m)
                return None
        for m in matches:
            outcome.offered[m.rule] = outcome.offered.get(m.rule, 0) + 1
        chosen = matches[pick % len(matches)]
        outcome.applied.append(chosen)
        graph = engine.apply(graph, chosen)
    return graph


def check_export(original: onnx.ModelProto, graph: Graph, feeds, expected) -> str | None:
    """None when both exports pass the full checker and compute the original's outputs."""
    names = [o.name for o in original.graph.output]
    for fold in (False, True):
        exported = to_model(graph, fold_constants=fold)
        try:
            onnx.checker.check_model(exported, full_check=True)
        except Exception as exc:
            return f"fold={fold}: checker: {str(exc).splitlines()[0][:300]}"
        if [o.name for o in exported.graph.output] != names:
            return f"fold={fold}: output names changed"
        try:
            actual = run_model(exported, feeds)
        except Exception as exc:
            return f"fold={fold}: onnxruntime cannot run it: {str(exc).splitlines()[0][:300]}"
        report = compare_outputs(names, expected, actual, PROPERTY_TOLERANCE)
        if not report.ok:
            worst = max(report.outputs, key=lambda o: o.max_abs_error)
            return f"fold={fold}: outputs differ ({worst.name}: max abs error {worst.max_abs_error:.3g})"
    return None


def shuffled_copy(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The same model with nodes renamed and reordered, and intermediate values renamed."""
    rnd = random.Random(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = {v.name for v in out.graph.input} | {v.name for v in out.graph.output} | {t.name for t in out.graph.initializer}
    renamed: dict[str, str] = {}
    for node in out.graph.node:
        for v in node.output:
            if v and v not in keep:
                renamed[v] = f"t{rnd.getrandbits(40):x}_{len(renamed)}"
    nodes = list(out.graph.node)
    rnd.shuffle(nodes)
    copies = []
    for i, node in enumerate(nodes):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"renamed_{rnd.getrandbits(32):x}_{i}"
        for j, v in enumerate(copy.input):
            copy.input[j] = renamed.get(v, v)
        for j, v in enumerate(copy.output):
            copy.output[j] = renamed.get(v, v)
        copies.append(copy)
    del out.graph.node[:]
    out.graph.node.extend(copies)
    del out.graph.value_info[:]
    return out


def check_sequence(engine: RewriteEngine, model: onnx.ModelProto, picks: list[int], seed: int = 0) -> SequenceOutcome:
    """Apply picked matches to `model`, export, and check function, validity and hash invariance."""
    outcome = SequenceOutcome()
    graph = load_graph(model)
    result = apply_picks(engine, graph, picks, outcome)
    if result is None:
        return outcome
    feeds = random_inputs(model, seed=seed)
    expected = run_model(model, feeds)
    outcome.failure = check_export(model, result, feeds, expected)
    if outcome.failure is None:
        exported = to_model(result)
        reference_hash = load_graph(exported).structural_hash()
        if load_graph(shuffled_copy(exported, seed)).structural_hash() != reference_hash:
            outcome.failure = "structural_hash changed under node renaming/reordering"
    if outcome.failure is not None:
        outcome.failed_step = len(outcome.applied)
    return outcome


def minimal_failing_prefix(engine: RewriteEngine, model: onnx.ModelProto, picks: list[int], seed: int = 0) -> SequenceOutcome:
    """The shortest prefix of `picks` that still fails (the failure of `picks` itself when no prefix does)."""
    for length in range(len(picks) + 1):
        outcome = check_sequence(engine, model, picks[:length], seed)
        if outcome.failure is not None:
            return outcome
    return check_sequence(engine, model, picks, seed)
