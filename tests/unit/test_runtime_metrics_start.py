"""A runtime's counters exist at 0 from the start: a series Prometheus first
scrapes at 1 has no increase(), so without them the first requests after a
(re)start would be missing from the operator's demand and energy figures."""

from __future__ import annotations

import httpx
from runtime_harness import MODEL, ServedRuntime, build_byte_model
from terrace_runtime.metrics import SERVED_ENDPOINTS


def test_counters_start_at_zero_and_requests_count_on_the_same_series(tmp_path) -> None:
    with ServedRuntime(build_byte_model(tmp_path)) as runtime:
        before = {
            lbl["endpoint"]: v
            for lbl, v in runtime.samples("terrace_runtime_requests_total")
            if lbl["status"] == "200"
        }
        assert before == dict.fromkeys(SERVED_ENDPOINTS, 0.0)
        for name in (
            "terrace_runtime_tokens_generated_total",
            "terrace_runtime_prompt_tokens_total",
            "terrace_runtime_busy_seconds_total",
            "terrace_runtime_energy_joules_total",
        ):
            assert runtime.samples(name) == [({"model": MODEL}, 0.0)], name

        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(runtime.url + "/v1/completions", json=body).status_code == 200
        after = {
            lbl["endpoint"]: v
            for lbl, v in runtime.samples("terrace_runtime_requests_total")
            if lbl["status"] == "200"
        }
        # The answer counted on the series that was there at 0.
        assert after == before | {"completions": 1.0}
        assert runtime.metric("terrace_runtime_tokens_generated_total") == 2.0
