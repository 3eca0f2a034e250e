"""The rule table. Its order is the action layout of the agent; `RULE_FINGERPRINT` identifies it."""

from __future__ import annotations

from typing import Iterable, Sequence

from xrlflow.rules.merge_parallel_matmul import MergeParallelMatMul, SplitMergedMatMul
from xrlflow.rules.merge_parallel_conv import MergeParallelConv, SplitMergedConv
from xrlflow.rules.enlarge_conv_kernel import EnlargeConvKernel, ShrinkConvKernel
from xrlflow.rules.fuse_conv_sum import FuseConvSum, SplitConvSum
from xrlflow.rules.batch_shared_weight_conv import BatchSharedWeightConv, UnbatchSharedWeightConv
from xrlflow.rules.fold_batchnorm_into_conv import FoldBatchNormIntoConv
from xrlflow.rules.hoist_unary_above_split import HoistUnaryAboveSplit, SinkUnaryBelowSplit
from xrlflow.rules.hoist_unary_over_concat import HoistUnaryOverConcat, SinkUnaryIntoConcat
from xrlflow.rules.hoist_const_binary_above_split import (
    HoistConstBinaryAboveSplit, HoistConstBinaryOverConcat, SinkConstBinaryBelowSplit, SinkConstBinaryIntoConcat,
)
from xrlflow.rules.cancel_split_concat import CancelConcatSplit, CancelSliceConcat, CancelSplitConcat
from xrlflow.rules.batch_shared_weight_matmul import BatchSharedWeightMatMul, UnbatchSharedWeightMatMul
from xrlflow.rules.reassociate_matmul import ReassociateMatMul, SplitMatMulChain
from xrlflow.rules.factor_matmul_add import ExpandMatMulAdd, ExpandMulAdd, FactorMatMulAdd, FactorMulAdd
from xrlflow.rules.transpose_matmul import (
    MoveTransposeAfterUnary, MoveTransposeBeforeUnary, TransposeMatMul, UntransposeMatMul,
)
from xrlflow.rules.fold_const_chain import FoldConstChain, FoldScaleIntoMatMul, UnfoldConstChain, UnfoldScaleFromMatMul
from xrlflow.rules.reassociate_add import ReassociateAdd, ReassociateAddLeft
from xrlflow.rules.compose_transposes import CancelIdentityTranspose, ComposeTransposes, SplitTranspose
from xrlflow.rules.transpose_gemm import (
    AbsorbTransposeIntoGemm, ExtractTransposeFromGemm, TransposeGemm, UntransposeGemm,
)
from xrlflow.rules.transpose_reshape import MoveReshapeBeforeTranspose, MoveTransposeBeforeReshape
from xrlflow.rules.transpose_split_concat import (
    MoveTransposeAfterConcat, MoveTransposeAfterSplit, MoveTransposeBeforeConcat, MoveTransposeBeforeSplit,
)
from xrlflow.rules.transpose_const_binary import MoveTransposeAfterConstBinary, MoveTransposeBeforeConstBinary
from xrlflow.rules.move_scale_across_matmul import MoveScaleIntoMatMul, MoveScaleOutOfMatMul
from xrlflow.rules.matmul_add_to_gemm import GemmToMatMulAdd, MatMulAddToGemm
from xrlflow.rules.compose_reshapes import CancelIdentityReshape, ComposeReshapes
from xrlflow.rules.move_scale_across_reshape import MoveScaleAfterReshape, MoveScaleBeforeReshape
from xrlflow.rules.fuse_multihead_attention import FuseMultiHeadAttention
from xrlflow.rules.fuse_packed_qkv_attention import FusePackedQkvAttention
from xrlflow.engine import RewriteEngine, Rule
from xrlflow.errors import BadInputError
from xrlflow.names import did_you_mean

# name                          class (each file in rules/ is named after its forward rule)
RULES: tuple[Rule, ...] = (
    MergeParallelMatMul(),
    SplitMergedMatMul(),
    MergeParallelConv(),
    SplitMergedConv(),
    EnlargeConvKernel(),
    ShrinkConvKernel(),
    FuseConvSum(),
    SplitConvSum(),
    BatchSharedWeightConv(),
    UnbatchSharedWeightConv(),
    FoldBatchNormIntoConv(),
    HoistUnaryAboveSplit(),
    SinkUnaryBelowSplit(),
    HoistUnaryOverConcat(),
    SinkUnaryIntoConcat(),
    HoistConstBinaryAboveSplit(),
    SinkConstBinaryBelowSplit(),
    HoistConstBinaryOverConcat(),
    SinkConstBinaryIntoConcat(),
    CancelSplitConcat(),
    CancelConcatSplit(),
    CancelSliceConcat(),
    BatchSharedWeightMatMul(),
    UnbatchSharedWeightMatMul(),
    ReassociateMatMul(),
    SplitMatMulChain(),
    FactorMatMulAdd(),
    ExpandMatMulAdd(),
    FactorMulAdd(),
    ExpandMulAdd(),
    TransposeMatMul(),
    UntransposeMatMul(),
    MoveTransposeBeforeUnary(),
    MoveTransposeAfterUnary(),
    FoldConstChain(),
    UnfoldConstChain(),
    FoldScaleIntoMatMul(),
    UnfoldScaleFromMatMul(),
    ReassociateAdd(),
    ReassociateAddLeft(),
    # transposition algebra (attention layouts): rules/compose_transposes.py, transpose_gemm.py,
    # transpose_reshape.py, transpose_split_concat.py, transpose_const_binary.py, move_scale_across_matmul.py,
    # matmul_add_to_gemm.py, compose_reshapes.py, move_scale_across_reshape.py
    ComposeTransposes(),
    SplitTranspose(),
    CancelIdentityTranspose(),
    AbsorbTransposeIntoGemm(),
    ExtractTransposeFromGemm(),
    TransposeGemm(),
    UntransposeGemm(),
    MoveReshapeBeforeTranspose(),
    MoveTransposeBeforeReshape(),
    MoveTransposeBeforeSplit(),
    MoveTransposeAfterSplit(),
    MoveTransposeAfterConcat(),
    MoveTransposeBeforeConcat(),
    MoveTransposeAfterConstBinary(),
    MoveTransposeBeforeConstBinary(),
    MoveScaleIntoMatMul(),
    MoveScaleOutOfMatMul(),
    MatMulAddToGemm(),
    GemmToMatMulAdd(),
    ComposeReshapes(),
    CancelIdentityReshape(),
    MoveScaleBeforeReshape(),
    MoveScaleAfterReshape(),
    # attention fusions into onnxruntime's contrib ops (com.microsoft)
    FuseMultiHeadAttention(),
    FusePackedQkvAttention(),
)


def check_reverses(rules: Sequence[Rule]) -> None:
    """Every rule's `reverse` names a rule of `rules` whose own `reverse` names it back (or is None)."""
    by_name = {rule.name: rule for rule in rules}
    for rule in rules:
        if rule.reverse is None:
            continue
        back = by_name.get(rule.reverse)
        if back is None:
            raise ValueError(f"rule {rule.name!r}: its reverse {rule.reverse!r} is not registered")
        if back.reverse != rule.name:
            raise ValueError(f"rule {rule.name!r}: its reverse {back.name!r} names {back.reverse!r} as its reverse")


check_reverses(RULES)


# Normalisations onnxruntime performs itself, applied exhaustively before a search starts (see
# RewriteEngine.canonicalize): they cost nothing at run time and would otherwise fill the action budget.
CANONICAL_RULES: tuple[str, ...] = ("fold-batchnorm-into-conv",)


def rule_names() -> list[str]:
    return [r.name for r in RULES]


def select_rules(enable: Iterable[str] | None = None, disable: Iterable[str] | None = None) -> tuple[Rule, ...]:
    """The registry filtered by --rules / --disable-rules (registry order kept)."""
    known = set(rule_names())
    chosen = list(enable) if enable else []
    dropped = list(disable) if disable else []
    unknown = sorted((set(chosen) | set(dropped)) - known)
    if unknown:
        named = ", ".join(name + did_you_mean(name, known) for name in unknown)
        raise BadInputError(f"unknown rule(s) {named}; `xrlflow rules` lists them")
    return tuple(r for r in RULES if (not chosen or r.name in chosen) and r.name not in dropped)


def default_engine() -> RewriteEngine:
    return RewriteEngine(RULES)


RULE_FINGERPRINT = RewriteEngine(RULES).fingerprint
