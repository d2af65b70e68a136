"""Complexity classifier: how likely a prompt needs a larger tier.

    from terrace_router.classifier import Classifier
    clf = Classifier.load("builtin")      # or a directory from `terrace-classifier train`
    clf.score("Prove that ...")           # float in [0, 1], higher = larger tier

Features (features.py) are extracted in Python; the model is a small ONNX
graph run by onnxruntime (model.py). Training (training.py, builder.py) and
evaluation (evaluation.py) use numpy only. See docs/classifier.md.
"""

from .features import FEATURE_SPEC_VERSION
from .model import Classifier, benchmark_score

__all__ = ["Classifier", "FEATURE_SPEC_VERSION", "benchmark_score"]
