"""`terrace-classifier`: train, evaluate and run the complexity classifier.

    terrace-classifier train --data mmlu_routing.jsonl --out DIR
    terrace-classifier eval  --data mmlu_routing.jsonl [--model DIR] [--check]
    terrace-classifier score "some prompt"     |   terrace-classifier score --data FILE.jsonl
    terrace-classifier bench [--data FILE.jsonl]

Rebuild the shipped model (deterministic: same data, same bytes):
    terrace-classifier train --data ../shared/data/routing/mmlu_routing.jsonl \\
        --out router/terrace_router/classifier/builtin
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _train(args: argparse.Namespace) -> int:
    from .builder import train_to_dir
    from .training import TrainConfig

    config = TrainConfig(l2=args.l2, min_source_large_accuracy=args.min_source_large_accuracy)
    meta = train_to_dir(args.data, args.out, config, with_eval=not args.no_eval)
    t = meta["train"]
    print(f"trained on {t['rows_used']} of {t['rows']} rows "
          f"(left out: {', '.join(t['excluded_sources']) or 'none'}); wrote {args.out}")
    print(f"default threshold (share {meta['default_target_large_share']}): "
          f"{meta['default_threshold']:.4f}")
    for name, m in meta["metrics"].items():
        a = m["apgr"]
        print(f"APGR {name}: classifier {a['classifier']:.4f}  random {a['random']:.4f}  "
              f"length {a['length']:.4f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from . import evaluation, training
    from .model import Classifier

    rows = training.load_rows(args.data)
    X = training.feature_matrix([r.prompt for r in rows])
    config = training.TrainConfig(l2=args.l2,
                                  min_source_large_accuracy=args.min_source_large_accuracy)
    clf = None
    if args.model:
        clf = Classifier.load(args.model)
        # Re-train with the recipe the given model was built with.
        config = training.TrainConfig(**clf.metadata["train"]["config"])
    print(f"{len(rows)} rows, {len(set(r.source for r in rows))} sources; recipe {config}")
    print("cross-validated: every fold scored by a model trained without it\n")
    results = evaluation.cross_validate(rows, X, config, k=args.folds)
    for result in results:
        print(evaluation.format_result(result))
        print()
    if clf is not None:
        scores = np.asarray(clf.score_many([r.prompt for r in rows]), dtype=np.float64)
        same = clf.metadata["train"]["data_sha256"] == training.file_sha256(args.data)
        as_is = evaluation.evaluate_scores("as-is", scores, rows, np.zeros(len(rows), dtype=int))
        print(f"model {args.model} as it is on this data"
              f"{' (IN-SAMPLE: it was trained on this file)' if same else ''}:")
        print(evaluation.format_result(as_is))
        print()
    subject = results[0]
    ok = subject.beats_baselines()
    print(("PASS" if ok else "FAIL") + f": subject-held-out APGR classifier "
          f"{subject.apgr['classifier']:.4f} vs random {subject.apgr['random']:.4f} "
          f"vs length {subject.apgr['length']:.4f}")
    return 1 if (args.check and not ok) else 0


def _score(args: argparse.Namespace) -> int:
    from .model import Classifier
    from .training import load_prompts

    if (args.text is None) == (args.data is None):
        print("terrace-classifier score: give either TEXT or --data FILE", file=sys.stderr)
        return 2
    clf = Classifier.load(args.model)
    texts = [args.text] if args.text is not None else load_prompts(args.data)
    for s in clf.score_many(texts):
        print(f"{float(s):.6f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .model import Classifier, benchmark_score
    from .training import load_prompts

    clf = Classifier.load(args.model)
    texts = (load_prompts(args.data) if args.data else
             ["hi, how are you?", "Prove that sqrt(2) is irrational, step by step.",
              "Write a Python function that merges two sorted lists. " * 30])
    texts = [t for t in texts if len(t) <= args.max_chars][: args.n]
    print(json.dumps(benchmark_score(texts, clf)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="terrace-classifier",
                                 description="Terrace complexity classifier "
                                             "(higher = larger tier).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def recipe(p: argparse.ArgumentParser) -> None:
        p.add_argument("--l2", type=float, default=0.1, help="L2 strength per head (default 0.1)")
        p.add_argument("--min-source-large-accuracy", type=float, default=0.25,
                       help="leave out of training the sources where the large model is below "
                            "this accuracy (broken labels); 0 keeps all (default 0.25)")

    p = sub.add_parser("train", help="train on a routing JSONL file, write model.onnx + metadata")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-eval", action="store_true", help="skip the cross-validation metrics")
    recipe(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="quality vs large share, APGR, against random and length")
    p.add_argument("--data", required=True)
    p.add_argument("--model", help="evaluate this model directory too (and re-train its recipe)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless the classifier beats both baselines on held-out subjects")
    recipe(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("score", help="score TEXT, or every line of --data (one score a line)")
    p.add_argument("text", nargs="?")
    p.add_argument("--data")
    p.add_argument("--model", default="builtin")
    p.set_defaults(func=_score)

    p = sub.add_parser("bench", help="latency of one score() call (p50/p99, microseconds)")
    p.add_argument("--data")
    p.add_argument("--model", default="builtin")
    p.add_argument("--max-chars", type=int, default=2000)
    p.add_argument("-n", type=int, default=2000)
    p.set_defaults(func=_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:
        print(f"terrace-classifier: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
