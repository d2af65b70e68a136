"""`terrace-runtime`: serve one model, or build the demo models.

terrace-runtime serve --model URI --format onnx|torch [--device cpu|cuda] [--port P] ...
terrace-runtime build-demo-models --out DIR [--preset demo|tiny]
terrace-runtime convert --from GGUF|HF_FOLDER --to torch|onnx-int4|onnx-fp32 --out DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="terrace-runtime",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve one model over OIP v2 and the OpenAI API")
    # Defaults are None so that unset flags fall back to TERRACE_RUNTIME_* variables.
    serve.add_argument("--model", help="path, file://, pvc://claim/path or http(s):// URI")
    serve.add_argument("--format", choices=["onnx", "torch"])
    serve.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="default: cpu for onnx, cuda-if-present for torch",
    )
    serve.add_argument(
        "--task",
        choices=["auto", "tensor", "text-generation"],
        help="default: what the model's metadata says",
    )
    serve.add_argument("--name", help="model name in the APIs (default: the file's stem)")
    serve.add_argument("--host", help="bind address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default 8080; 0 picks a free one)")
    serve.add_argument("--max-batch-size", type=int, help="rows/sequences per batch (default 32)")
    serve.add_argument(
        "--max-wait-ms", type=float, help="how long a batch may wait for more requests (default 0)"
    )
    serve.add_argument(
        "--max-queue", type=int, help="queued requests before answering 429 (default 256)"
    )
    serve.add_argument(
        "--quantize", choices=["none", "int8"], help="int8 dynamic quantization (ONNX only)"
    )
    serve.add_argument(
        "--threads", type=int, help="intra-op threads (default: the container's CPU limit)"
    )
    serve.add_argument(
        "--spinning",
        action=argparse.BooleanOptionalAction,
        help="let onnxruntime threads spin between ops (lower latency, more CPU; default off)",
    )
    serve.add_argument("--sha256", help="expected sha256 of the model file")
    serve.add_argument("--cache-dir", type=Path, help="where downloads and int8 models go")
    serve.add_argument("--pvc-root", type=Path, help="where PVCs are mounted (default /mnt/models)")
    serve.add_argument(
        "--energy-model",
        choices=["cpu", "none"],
        help="estimate joules with the CPU power model (default cpu)",
    )
    serve.add_argument(
        "--watts-per-core", type=float, help="CPU power model: watts per busy core (default 10)"
    )
    serve.add_argument("--max-tokens-limit", type=int, help="largest max_tokens accepted")
    serve.add_argument(
        "--chat-template",
        help="Jinja chat template file for a model folder (replaces the model's own); "
        "'qa' is the packaged Q:/A: transcript for base models",
    )
    serve.add_argument("--log-level", help="debug, info, warning, error")

    build = sub.add_parser("build-demo-models", help="train and export the demo models")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument(
        "--preset",
        choices=["demo", "tiny"],
        default="demo",
        help="tiny: the same models, much smaller, for tests",
    )
    build.add_argument("--seed", type=int, default=0)

    conv = sub.add_parser(
        "convert",
        help="a GGUF file or Hugging Face folder -> a folder the runtime serves",
        description="torch: a Hugging Face folder (fp32) for format torch; onnx-int4 / "
        "onnx-fp32: an onnxruntime-genai folder for format onnx. Reuses --out when it "
        "already holds the same conversion.",
    )
    conv.add_argument("--from", dest="source", type=Path, required=True)
    conv.add_argument("--to", dest="form", choices=["torch", "onnx-int4", "onnx-fp32"])
    conv.add_argument("--out", type=Path, required=True)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .settings import ServeSettings

    given: dict[str, Any] = {
        k: v for k, v in vars(args).items() if v is not None and k != "command"
    }
    try:
        settings = ServeSettings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"terrace-runtime: {where}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvicorn

    from .app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0


def _build(args: argparse.Namespace) -> int:
    from .demo_models import build_demo_models

    build_demo_models(args.out, preset=args.preset, seed=args.seed)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, convert

    try:
        out = convert(args.source, args.form or "onnx-int4", args.out)
    except ConversionError as exc:
        print(f"terrace-runtime convert: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "convert":
        return _convert(args)
    return _build(args)


if __name__ == "__main__":
    sys.exit(main())
