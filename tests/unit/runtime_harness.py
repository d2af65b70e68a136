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
# The completion tokens of the request `settled_tokens` sends to prove nothing
# else generates.
PROBE_TOKENS = 8


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

    def wait_idle(self, timeout: float = 30) -> None:
        """Until the runtime reports no request in flight and none queued
        (its own gauges); fails after `timeout` s with the last values seen."""
        deadline = time.monotonic() + timeout
        while True:
            inflight = self.metric("terrace_runtime_inflight_requests")
            queued = self.metric("terrace_runtime_queue_depth")
            if inflight == 0 and queued == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"runtime not idle after {timeout} s: inflight={inflight}, queued={queued}"
                )
            time.sleep(0.02)

    def settled_tokens(self) -> float:
        """Tokens generated so far, once nothing generates: the runtime
        reports no request in flight (`wait_idle`), and a new request then
        moves the token counter by exactly its own completion tokens (a
        generation left running would add its own while this one runs).
        The count returned includes that request's `PROBE_TOKENS`."""
        self.wait_idle()
        return self.assert_only_new_requests_generate()

    def assert_only_new_requests_generate(self) -> float:
        """With no request in flight, one new completion of `PROBE_TOKENS`
        moves the token counter by exactly that many; the counter after it."""
        assert self.metric("terrace_runtime_inflight_requests") == 0
        before = self.metric("terrace_runtime_tokens_generated_total")
        body = {"model": MODEL, "prompt": "Once", "max_tokens": PROBE_TOKENS,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        r = httpx.post(self.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == PROBE_TOKENS, r.text
        after = self.metric("terrace_runtime_tokens_generated_total")
        assert after - before == PROBE_TOKENS, (
            f"the counter moved by {after - before} during one request of {PROBE_TOKENS} "
            "tokens: something else is still generating"
        )
        return after


# What schemathesis holds a served OpenAPI document to (runtime and router).
OPENAPI_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
