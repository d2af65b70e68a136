"""`terrace-router`: serve the router, or check a routing table.

terrace-router serve --config /etc/terrace/router.yaml
terrace-router serve --tier small=http://127.0.0.1:9001 --tier large=http://127.0.0.1:9002
terrace-router check --config FILE
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from .config import CalibrationConfig, RouterConfig, TierConfig, load


def config_from_flags(tiers: Sequence[str], target_large_share: float | None) -> RouterConfig:
    """Quick mode: `name=url[,url...]` per tier, cheapest first, OpenAI upstreams,
    the built-in classifier and the default target share."""
    parsed = []
    for spec in tiers:
        name, sep, urls = spec.partition("=")
        if not sep or not name or not urls:
            raise ValueError(f"--tier {spec!r}: expected NAME=URL[,URL...]")
        parsed.append(TierConfig(name=name, endpoints=[u for u in urls.split(",") if u]))
    calibration = (
        CalibrationConfig(target_large_share=target_large_share)
        if target_large_share is not None
        else CalibrationConfig()
    )
    return RouterConfig(tiers=parsed, calibration=calibration)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="terrace-router", description="Terrace router: complexity-scored tier routing."
    )
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI and OIP v2 APIs")
    src = serve.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="routing table file (YAML/JSON); reloaded when it changes")
    src.add_argument(
        "--tier",
        action="append",
        metavar="NAME=URL[,URL]",
        help="a tier, cheapest first (repeat); quick mode without a file",
    )
    serve.add_argument(
        "--target-large-share",
        type=float,
        default=None,
        help="quick mode: share of traffic meant for tiers past the first",
    )
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the config file",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    check = sub.add_parser("check", help="validate a routing table file and print it normalized")
    check.add_argument("--config", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            sys.stdout.write(load(args.config).dump())
            return 0
        config = (
            load(args.config)
            if args.config
            else config_from_flags(args.tier, args.target_large_share)
        )
    except (OSError, ValueError, ValidationError) as exc:
        print(f"terrace-router: invalid routing table: {exc}", file=sys.stderr)
        return 2
    return _serve(args, config)


def _serve(args: argparse.Namespace, config: RouterConfig) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(
            config,
            config_path=args.config,
            reload_interval=args.reload_interval,
        )
    except (OSError, ValueError) as exc:  # e.g. the API key file named in the table is missing
        print(f"terrace-router: cannot start: {exc}", file=sys.stderr)
        return 2
    # No access log: a line per request costs more than routing it.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=75,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
