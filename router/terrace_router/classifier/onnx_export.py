"""The classifier as an ONNX graph: two logistic heads and their difference.

Input  `features`  float32 [N, F]   (features.extract, in FEATURE_NAMES order)
Output `score`     float32 [N, 1]   0.5 + 0.5 * (P(large correct) - P(small correct))
Output `p_correct` float32 [N, 2]   (P(small correct), P(large correct))

Standardisation of the learned features is folded into the weights, so the
graph is MatMul, Add, Sigmoid, MatMul, Add: a few microseconds in
onnxruntime, whose per-call overhead dominates.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# onnxruntime 1.18 (the oldest the project allows) runs opset 20 and IR 9.
OPSET = 17
IR_VERSION = 8


def build_model(weights: np.ndarray, bias: np.ndarray, *, doc: str = "") -> onnx.ModelProto:
    """weights [F, 2] and bias [2], raw-feature scale (standardisation folded in)."""
    weights = np.asarray(weights, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    if weights.ndim != 2 or weights.shape[1] != 2 or bias.shape != (2,):
        raise ValueError(f"weights must be [F, 2] and bias [2], got {weights.shape} {bias.shape}")
    n_features = weights.shape[0]
    inits = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "b"),
        # score = 0.5 * p_large - 0.5 * p_small + 0.5
        numpy_helper.from_array(np.array([[-0.5], [0.5]], dtype=np.float32), "gain"),
        numpy_helper.from_array(np.array([0.5], dtype=np.float32), "half"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["logits_nb"]),
        helper.make_node("Add", ["logits_nb", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["p_correct"]),
        helper.make_node("MatMul", ["p_correct", "gain"], ["gain_half"]),
        helper.make_node("Add", ["gain_half", "half"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "terrace_complexity",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_features])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("p_correct", TensorProto.FLOAT, ["N", 2]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="terrace-classifier",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
