"""Complexity classifier: how likely a prompt needs a larger tier.

    from terrace_router.classifier import Classifier
    clf = Classifier.load("builtin")      # or a directory from `terrace-classifier train`
    clf.score("Prove that ...")           # float in [0, 1], higher = larger tier

A prompt is read twice: shape features in Python (features.py) and an
all-MiniLM-L6-v2 sentence embedding on onnxruntime (encoder.py). Two
logistic heads over both, a domain-free prior over length, and how far the
prompt is from the training data blend into the score (training.py). See
docs/classifier.md.
"""

from .features import FEATURE_SPEC_VERSION
from .model import Classifier, benchmark_score

__all__ = ["Classifier", "FEATURE_SPEC_VERSION", "benchmark_score"]
