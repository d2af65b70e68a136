"""A runtime in the test process: a tiny byte-level text model, built in
seconds by the demo builder's own code, served by `create_app` on uvicorn
(127.0.0.1, a port the OS picks) in a thread, so tests can reach both its HTTP API
and its in-memory state."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from served import ServerThread
from terrace_runtime.app import create_app
from terrace_runtime.settings import ServeSettings
from terrace_runtime.state import RuntimeState

MODEL = "small"


def build_byte_model(out: Path) -> Path:
    """The `tiny` preset's small byte LM as ONNX in `out` (a few seconds)."""
    from terrace_runtime import demo_models as dm

    torch, _, _ = dm._torch_modules()
    plan = dm.PRESETS["tiny"]
    model, _ = dm.train_lm(plan.small, dm.corpus_tokens(dm.stdlib_corpus(plan.corpus_bytes)), 0)
    path = out / "text-small.onnx"
    dm.export_onnx(
        model,
        dm._lm_examples(torch, plan.small.context),
        path,
        dm.lm_metadata(plan.small, dm.TOKENIZER.vocab_size),
    )
    return path


class ServedRuntime:
    """`terrace-runtime serve` in this process; a context manager."""

    def __init__(self, model: Path, **settings: Any) -> None:
        self.settings = ServeSettings(
            model=str(model), format="onnx", name=MODEL, threads=1, **settings
        )
        self.state = RuntimeState.from_settings(self.settings)
        self.app = create_app(self.settings, self.state)
        self.server = ServerThread(self.app)
        self.port = self.server.port
        self.url = self.server.url

    def __enter__(self) -> ServedRuntime:
        self.server.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise TimeoutError(f"runtime not ready: {self.state.reason}")

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called `name` on /metrics, with its labels."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return [
            (s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        ]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        return sum(
            v for lbl, v in self.samples(name) if all(lbl.get(k) == x for k, x in labels.items())
        )

    def wait_generating(self, before: float, timeout: float = 30) -> None:
        """Until more than `before` tokens have been generated (a request sent
        since has started); fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while self.metric("terrace_runtime_tokens_generated_total") <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"no token generated in {timeout} s")
            time.sleep(0.02)

    def tokens_when_settled(self) -> float:
        """Tokens generated so far, once the count has stopped moving; fails
        after 10 s of growth (something kept generating)."""
        before = self.metric("terrace_runtime_tokens_generated_total")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.metric("terrace_runtime_tokens_generated_total")
            if now == before:
                return now
            before = now
        raise AssertionError("the runtime kept generating after its client left")


# What schemathesis holds a served OpenAPI document to (runtime and router).
OPENAPI_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
