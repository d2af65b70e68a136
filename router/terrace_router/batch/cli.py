"""`terrace-batch`: OpenAI's Batch API for a TierRouter, released into clean hours.

It serves the Files and Batch APIs and runs the worker that releases each
batch's lines to the router when the grid is clean, never past the window.

    terrace-batch --router http://router.demo.svc:8080 \
        --store sqlite:////var/lib/terrace-batch/batches.db --port 8090
    terrace-batch --router ... --store postgresql+psycopg://terrace@db/terrace \
        --prometheus http://prometheus:9090 \
        --signal 'grid_carbon_intensity_gco2_per_kwh{zone="DE"}'

One process owns its store (SQLite: one replica; PostgreSQL: any number,
each claiming lines with row locks). Settings come from TERRACE_BATCH_*
environment variables, then flags. Port 0 picks a free port (logged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..auth import ApiKeys
from ..config import AuthConfig
from .api import create_batch_app
from .metrics import BatchMetrics
from .store import Store
from .worker import GridSignal, Worker, WorkerSettings

log = logging.getLogger("terrace.batch")


class BatchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TERRACE_BATCH_", extra="ignore")

    store: str = Field(
        default="sqlite:///terrace-batch.db",
        description="SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
    )
    router: str = Field(description="the TierRouter's base URL, where lines are sent (required)")
    router_api_key: str | None = Field(
        default=None, description="key sent to the router; default: the first of api_keys_file"
    )
    api_keys_file: str | None = Field(default=None, description="keys clients must send")
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8090, ge=0, le=65535, description="port (0: any free one, logged)")
    prometheus: str | None = Field(default=None, description="Prometheus base URL")
    signal: str | None = Field(
        default=None,
        description="PromQL of the grid signal (one value); default with --prometheus: the "
        "cluster's demand (routing decisions), so lines go in its low-demand hours",
    )
    threshold: float | None = Field(default=None, description="also release at or below this")
    forecast: str | None = Field(
        default=None,
        description="PromQL of the signal's forecast, one series per hours_ahead label; "
        "default: the signal's values at the same hours yesterday",
    )
    carbon_query: str | None = Field(
        default=None, description="PromQL of the grid's intensity in gCO2/kWh, for batch CO2"
    )
    slots: int = Field(default=8, ge=1, le=1024, description="lines of a batch in flight at most")
    interval_seconds: float = Field(default=1.0, gt=0, description="seconds between worker passes")
    lease_seconds: float = Field(
        default=120.0, gt=0, description="a claimed, unanswered line returns after this"
    )
    min_window_seconds: int = Field(default=3600, ge=1, description="shortest completion_window")
    max_window_seconds: int = Field(
        default=72 * 3600, ge=1, description="longest completion_window"
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING")


def _first_key(path: str | None) -> str | None:
    """The first key of a keys file (one a line, # comments): the one
    terrace-batch sends to the router when no router_api_key is given, so
    the operator can hand it the router's own keys file."""
    if not path:
        return None
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    return None


def create_service(settings: BatchSettings) -> Starlette:
    """The Batch API app; its lifespan runs the worker."""
    if (settings.signal or settings.carbon_query or settings.forecast) and not settings.prometheus:
        raise ValueError(
            "a grid signal, forecast or carbon query needs a Prometheus URL (--prometheus)"
        )
    keys = ApiKeys.from_config(AuthConfig(api_keys_file=settings.api_keys_file))
    grid = (
        GridSignal(
            settings.prometheus,
            settings.signal,
            carbon_query=settings.carbon_query,
            forecast_query=settings.forecast,
        )
        if settings.prometheus
        else None
    )
    store = Store(settings.store)
    router_key = settings.router_api_key or _first_key(settings.api_keys_file)
    metrics = BatchMetrics()
    worker = Worker(
        store,
        settings.router,
        router_key,
        WorkerSettings(
            interval_seconds=settings.interval_seconds,
            slots=settings.slots,
            lease_seconds=settings.lease_seconds,
            threshold=settings.threshold,
        ),
        grid,
        metrics,
    )
    headers = {"authorization": f"Bearer {router_key}"} if router_key else {}

    async def models() -> set[str] | None:
        """What the router serves (its /v1/models), for the unknown-model check."""
        try:
            async with httpx.AsyncClient(timeout=10) as c:
                r = await c.get(f"{settings.router.rstrip('/')}/v1/models", headers=headers)
            if r.status_code == 200:
                return {m["id"] for m in r.json()["data"]}
            log.warning("cannot check models: the router's /v1/models said %s", r.status_code)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            log.warning("cannot check models: %s", e)
        return None

    app = create_batch_app(
        store, keys, models, (settings.min_window_seconds, settings.max_window_seconds)
    )

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    app.router.routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    app.router.routes.append(Route("/healthz", healthz, methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(worker.run(), name="terrace-batch-worker")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()

    app.router.lifespan_context = lifespan
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="terrace-batch", description=__doc__.split("\n")[0])
    for name, field in BatchSettings.model_fields.items():
        default = "" if field.is_required() else f" (default: {field.default})"
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, help=(field.description or name) + default
        )
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    try:
        settings = BatchSettings(**args)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        app = create_service(settings)
        # One line per request sent is only useful when debugging.
        logging.getLogger("httpx").setLevel(
            logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
        )
    except (ValidationError, ValueError) as e:
        print(f"terrace-batch: invalid settings: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
