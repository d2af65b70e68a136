"""terrace-runtime end to end on 127.0.0.1: the demo models are built once per
session by the real builder (tiny preset), then real `terrace-runtime serve`
processes answer real clients (httpx for OIP v2, the `openai` package for the
OpenAI API)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from localproc import UVICORN_PORT, port_from_log
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 90
# The one core the `tensor` server is pinned to: its default thread count
# must come out as 1 whatever the host has.
ONE_CORE = {min(os.sched_getaffinity(0))}


class Server:
    """One `terrace-runtime serve` process on port 0 (the port it bound is read
    from its log), stopped by PID; `cores` pins it to those CPUs."""

    def __init__(
        self, name: str, args: list[str], workdir: Path, cores: set[int] | None = None
    ) -> None:
        self.name = name
        self.url = ""
        self.log_path = workdir / f"{name}.log"
        env = {**os.environ, "TERRACE_RUNTIME_CACHE_DIR": str(workdir / "cache")}
        self._log = self.log_path.open("w")
        # `-m terrace_runtime.cli`, or the same after pinning itself to `cores`
        # (in the child's own code: a preexec_fn is unsafe beside threads).
        start = ["-m", "terrace_runtime.cli"]
        if cores is not None:
            start = [
                "-c",
                f"import os, runpy; os.sched_setaffinity(0, {sorted(cores)}); "
                "runpy.run_module('terrace_runtime.cli', run_name='__main__', alter_sys=True)",
            ]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *start,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                "info",  # uvicorn names the port it bound at info
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, ready: bool = True) -> None:
        """Until live (and ready, unless told otherwise)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        if not self.url:
            port = port_from_log(self.proc, self.log_path, UVICORN_PORT, STARTUP_TIMEOUT_S)
            self.url = f"http://127.0.0.1:{port}"
        path = "/v2/health/ready" if ready else "/v2/health/live"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not {'ready' if ready else 'live'}:\n{self.log()}")

    def metrics(self) -> dict[str, list[tuple[str, dict[str, str], float]]]:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            families[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
        return families

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real builder through its CLI, tiny preset (same code, smaller models)."""
    out = tmp_path_factory.mktemp("demo-models")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "terrace_runtime.cli",
            "build-demo-models",
            "--out",
            str(out),
            "--preset",
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "built in" in result.stdout
    return out


@pytest.fixture(scope="session")
def servers(
    demo_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    work = tmp_path_factory.mktemp("runtime-servers")
    # The int8 model is cached beside its source: give it its own copy.
    int8_dir = work / "int8"
    int8_dir.mkdir()
    shutil.copy(demo_models / "tensor-mlp.onnx", int8_dir)
    m = demo_models
    specs = {
        # Default threads: exercises the cgroup-derived thread count (pinned
        # to one core below).
        "tensor": [
            "--model",
            f"file://{m}/tensor-mlp.onnx",
            "--format",
            "onnx",
            "--name",
            "mlp",
            "--max-wait-ms",
            "20",
        ],
        # Batches only when 4 rows wait (a minute is never reached): the
        # batching test's only user, so its batch counts are exact. Pinned to
        # one core with two threads asked for: the explicit count wins.
        "tensor-batch": [
            "--model",
            f"file://{m}/tensor-mlp.onnx",
            "--format",
            "onnx",
            "--name",
            "mlp",
            "--threads",
            "2",
            "--max-batch-size",
            "4",
            "--max-wait-ms",
            "60000",
        ],
        "tensor-torch": [
            "--model",
            str(m / "tensor-mlp.pt"),
            "--format",
            "torch",
            "--name",
            "mlp",
            "--threads",
            "1",
        ],
        "tensor-int8": [
            "--model",
            str(int8_dir / "tensor-mlp.onnx"),
            "--format",
            "onnx",
            "--name",
            "mlp",
            "--quantize",
            "int8",
            "--threads",
            "1",
        ],
        "text": [
            "--model",
            str(m / "text-small.onnx"),
            "--format",
            "onnx",
            "--name",
            "small",
            "--threads",
            "1",
            "--max-wait-ms",
            "20",
        ],
        # Starts a batch once 4 sequences wait: the text batching test's only user.
        "text-batch": [
            "--model",
            str(m / "text-small.onnx"),
            "--format",
            "onnx",
            "--name",
            "small",
            "--threads",
            "1",
            "--max-batch-size",
            "4",
            "--max-wait-ms",
            "30000",
        ],
        "text-torch": [
            "--model",
            str(m / "text-large.pt2"),
            "--format",
            "torch",
            "--name",
            "large",
            "--threads",
            "1",
        ],
        "text-tight": [
            "--model",
            str(m / "text-small.onnx"),
            "--format",
            "onnx",
            "--name",
            "tight",
            "--threads",
            "1",
            "--max-batch-size",
            "1",
            "--max-queue",
            "1",
            "--max-tokens-limit",
            "1000000",
        ],
        "missing": [
            "--model",
            str(work / "nope" / "absent.onnx"),
            "--format",
            "onnx",
            "--name",
            "absent",
            "--threads",
            "1",
        ],
    }
    started = {
        name: Server(
            name, args, work, cores=ONE_CORE if name in ("tensor", "tensor-batch") else None
        )
        for name, args in specs.items()
    }
    try:
        for name, server in started.items():
            server.wait(ready=name != "missing")
        yield started
    finally:
        for server in started.values():
            server.stop()


def _infer_body(x: np.ndarray, outputs: list[str] | None = None) -> dict[str, object]:
    body: dict[str, object] = {
        "id": "req-1",
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
    }
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return body


# --- builder and OIP v2 ---------------------------------------------------------


def test_builder_writes_every_model_with_manifest(demo_models: Path) -> None:
    manifest = json.loads((demo_models / "manifest.json").read_text())
    for entry in manifest["models"].values():
        path = demo_models / entry["file"]
        assert path.stat().st_size == entry["bytes"] > 0
    assert manifest["models"]["text-large"]["params"] > manifest["models"]["text-small"]["params"]
    assert (demo_models / "tokenizer.json").is_file()


def test_oip_metadata_and_health(servers: dict[str, Server]) -> None:
    s = servers["tensor"]
    assert httpx.get(s.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(s.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(s.url + "/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
    meta = httpx.get(s.url + "/v2/models/mlp").json()
    assert meta["name"] == "mlp" and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "probabilities": "FP32",
        "label": "INT64",
    }
    # No --threads: the count follows the cores the process may use, and it
    # was started pinned to one (unpinned, this host would give it more).
    assert meta["parameters"]["threads"] == 1
    # An explicit --threads wins over the cores (also pinned to one).
    batch_meta = httpx.get(servers["tensor-batch"].url + "/v2/models/mlp").json()
    assert batch_meta["parameters"]["threads"] == 2
    assert httpx.get(s.url + "/v2/models/other").status_code == 404


def test_oip_infer_shapes_and_dtypes(servers: dict[str, Server]) -> None:
    x = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    r = httpx.post(servers["tensor"].url + "/v2/models/mlp/infer", json=_infer_body(x))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "mlp" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["probabilities"]["datatype"] == "FP32" and out["probabilities"]["shape"] == [3, 4]
    assert out["label"]["datatype"] == "INT64" and out["label"]["shape"] == [3]
    probs = np.array(out["probabilities"]["data"]).reshape(3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert out["label"]["data"] == probs.argmax(axis=1).tolist()
    # Same weights as TorchScript: the torch runtime answers the same.
    r2 = httpx.post(
        servers["tensor-torch"].url + "/v2/models/mlp/infer", json=_infer_body(x, ["probabilities"])
    )
    assert r2.status_code == 200, r2.text
    assert [o["name"] for o in r2.json()["outputs"]] == ["probabilities"]
    torch_probs = np.array(r2.json()["outputs"][0]["data"]).reshape(3, 4)
    np.testing.assert_allclose(torch_probs, probs, atol=1e-5)


def test_oip_nested_data_is_accepted(servers: dict[str, Server]) -> None:
    x = np.ones((2, 32), dtype=np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 32], "datatype": "FP32", "data": x.tolist()}]}
    r = httpx.post(servers["tensor"].url + "/v2/models/mlp/infer", json=body)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"][0] == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape": [1, 31]}, "shape"),
        ({"shape": [32]}, "rank"),
        ({"datatype": "INT64"}, "datatype"),
        ({"name": "pixels"}, "unexpected input"),
        ({"data": [1.0] * 31}, "do not fill"),
        ({"data": ["a"] * 32}, "not numeric"),
    ],
)
def test_oip_bad_input_is_400_in_protocol_shape(
    servers: dict[str, Server], change: dict[str, object], message: str
) -> None:
    item = {"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32, **change}
    r = httpx.post(servers["tensor"].url + "/v2/models/mlp/infer", json={"inputs": [item]})
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and message in r.json()["error"]


def test_oip_bad_json_and_unknown_output(servers: dict[str, Server]) -> None:
    url = servers["tensor"].url + "/v2/models/mlp/infer"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(url, json=_infer_body(np.zeros((1, 32), np.float32), ["nope"]))
    assert r.status_code == 400 and "unknown outputs" in r.json()["error"]


def _batch_sizes(server: Server) -> tuple[float, float, float]:
    """The batch-size histogram: (batches, rows, batches of one row); zeros
    before the first batch (the labelled series does not exist yet)."""
    samples = server.metrics().get("terrace_runtime_batch_size", [])
    count = sum(v for n, _, v in samples if n.endswith("_count"))
    rows = sum(v for n, _, v in samples if n.endswith("_sum"))
    ones = sum(v for n, lbl, v in samples if n.endswith("_bucket") and lbl["le"] == "1.0")
    return count, rows, ones


def test_concurrency_32_forms_batches(servers: dict[str, Server]) -> None:
    s = servers["tensor-batch"]  # a batch starts only when 4 rows wait
    x = np.random.default_rng(1).normal(size=(1, 32)).astype(np.float32)
    count0, rows0, ones0 = _batch_sizes(s)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
            return await asyncio.gather(
                *[client.post("/v2/models/mlp/infer", json=_infer_body(x)) for _ in range(32)]
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32
    # Batched rows come back to their own requests: every answer is the one
    # the same model gives this row alone.
    alone = httpx.post(servers["tensor"].url + "/v2/models/mlp/infer", json=_infer_body(x))
    want = alone.json()["outputs"][0]["data"]
    for r in responses:
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], want, atol=1e-5)
    count, rows, ones = _batch_sizes(s)
    assert (count - count0, rows - rows0, ones - ones0) == (8, 32, 0)
    families = s.metrics()
    requests = {
        lbl["status"]: v
        for _, lbl, v in families["terrace_runtime_requests"]
        if lbl.get("endpoint") == "infer"
    }
    assert requests.get("200", 0) >= 32
    assert any(v > 0 for n, _, v in families["terrace_runtime_busy_seconds"])
    assert any(v > 0 for n, _, v in families["terrace_runtime_energy_joules"])


def test_int8_model_is_cached_beside_source_and_close(servers: dict[str, Server]) -> None:
    s = servers["tensor-int8"]
    meta = httpx.get(s.url + "/v2/models/mlp").json()
    assert meta["parameters"]["quantization"] == "int8"
    x = np.random.default_rng(2).normal(size=(4, 32)).astype(np.float32)
    fp32 = httpx.post(servers["tensor"].url + "/v2/models/mlp/infer", json=_infer_body(x)).json()
    int8 = httpx.post(s.url + "/v2/models/mlp/infer", json=_infer_body(x)).json()
    a = np.array(fp32["outputs"][0]["data"])
    b = np.array(int8["outputs"][0]["data"])
    assert np.abs(a - b).max() < 0.05
    cached = list(Path(s.proc.args[s.proc.args.index("--model") + 1]).parent.glob("*.int8.onnx"))
    assert len(cached) == 1


def test_missing_model_is_live_but_not_ready_with_reason(servers: dict[str, Server]) -> None:
    s = servers["missing"]
    assert httpx.get(s.url + "/v2/health/live").status_code == 200
    r = httpx.get(s.url + "/v2/health/ready")
    assert r.status_code == 503
    assert r.json()["ready"] is False and "model file not found" in r.json()["reason"]
    r = httpx.get(s.url + "/v2/models/absent/ready")
    assert r.status_code == 503 and "absent.onnx" in r.json()["reason"]
    r = httpx.post(s.url + "/v2/models/absent/infer", json={"inputs": []})
    assert r.status_code == 503 and "not ready" in r.json()["error"]
    assert s.proc.poll() is None
    assert "model file not found" in s.log()
    ready = s.metrics()["terrace_runtime_ready"]
    assert [v for _, _, v in ready] == [0.0]


# --- OpenAI API -------------------------------------------------------------------


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_models_list(servers: dict[str, Server]) -> None:
    models = _client(servers["text"]).models.list()
    assert [m.id for m in models.data] == ["small"]


def test_openai_completion_with_logprobs(servers: dict[str, Server]) -> None:
    client = _client(servers["text"])
    resp = client.completions.create(
        model="small", prompt="Return the", max_tokens=12, temperature=0, logprobs=3
    )
    choice = resp.choices[0]
    assert choice.finish_reason in ("length", "stop")
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == resp.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.top_logprobs is not None and all(len(t) == 3 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    for token, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert top[token] == max(top.values())
    assert resp.usage.prompt_tokens == len("Return the") + 1  # + BOS

    # Streaming gives the same greedy text, ending the SSE stream cleanly.
    stream = client.completions.create(
        model="small", prompt="Return the", max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_openai_chat_with_logprobs_and_stream(servers: dict[str, Server]) -> None:
    client = _client(servers["text"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    resp = client.chat.completions.create(
        model="small",
        messages=messages,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.logprobs is not None and choice.logprobs.content
    assert len(choice.logprobs.content[0].top_logprobs) == 2
    assert resp.usage.completion_tokens == len(choice.logprobs.content)

    stream = client.chat.completions.create(
        model="small",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=1,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    )
    streamed_lp = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t.token for t in streamed_lp] == [t.token for t in choice.logprobs.content]


def test_openai_stop_sequence_and_seeded_sampling(servers: dict[str, Server]) -> None:
    client = _client(servers["text"])
    sampled = dict(model="small", prompt="The ", max_tokens=30, temperature=1.0, seed=7)
    a = client.completions.create(**sampled)
    b = client.completions.create(**sampled)
    assert a.choices[0].text == b.choices[0].text  # same seed, same text

    greedy = dict(model="small", prompt="Return the", max_tokens=20, temperature=0)
    text = client.completions.create(**greedy).choices[0].text
    # A two-character ASCII stop string from inside the greedy answer.
    k = next(i for i in range(1, len(text) - 1) if text[i : i + 2].isascii())
    stop = text[k : k + 2]
    c = client.completions.create(**greedy, stop=[stop, "\u0001never"])
    assert c.choices[0].finish_reason == "stop"
    assert c.choices[0].text == text[: text.index(stop)]
    streamed = client.completions.create(**greedy, stop=[stop], stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.choices[0].text


def test_openai_errors_use_the_envelope(servers: dict[str, Server]) -> None:
    client = _client(servers["text"])
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="gpt-4", prompt="x")
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="small", prompt="x", logprobs=9)
    assert bad.value.body["param"] == "logprobs"  # type: ignore[index]
    r = httpx.post(servers["text"].url + "/v1/chat/completions", json={"model": "small"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # A tensor model has no text API.
    with pytest.raises(openai.BadRequestError):
        _client(servers["tensor"]).completions.create(model="mlp", prompt="x")


def test_text_generation_batches_concurrent_requests(servers: dict[str, Server]) -> None:
    s = servers["text-batch"]  # the first step waits for 4 sequences
    count0, _, ones0 = _batch_sizes(s)
    tokens0 = s.metrics().get("terrace_runtime_tokens_generated", [])

    async def many() -> list[str]:
        client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(
            *[
                client.completions.create(
                    model="small", prompt=f"def f{i}", max_tokens=8, temperature=0
                )
                for i in range(12)
            ]
        )
        await client.close()
        return [r.choices[0].finish_reason for r in rs]

    assert all(reason in ("length", "stop") for reason in asyncio.run(many()))
    count, _, ones = _batch_sizes(s)
    assert count - count0 > ones - ones0, "every step ran one sequence"
    tokens = s.metrics()["terrace_runtime_tokens_generated"]
    total = sum(v for n, _, v in tokens if n.endswith("_total"))
    assert total - sum(v for n, _, v in tokens0 if n.endswith("_total")) >= 12


def test_full_queue_answers_429_with_retry_after(servers: dict[str, Server]) -> None:
    s = servers["text-tight"]  # one sequence at a time, one waiting

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
            # Long enough to still run when the test is done; closing the stream ends it.
            body = {
                "model": "tight",
                "prompt": "a",
                "max_tokens": 1000000,
                "stream": True,
                "ignore_eos": True,
            }
            async with client.stream("POST", "/v1/completions", json=body) as running:
                # Keep the iterator: dropping it would close the stream (and end the run).
                lines = running.aiter_lines()
                await lines.__anext__()  # it is generating now
                queued = asyncio.create_task(
                    client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
                )
                for _ in range(200):  # until the second one waits in the queue
                    await asyncio.sleep(0.05)
                    text = (await client.get("/metrics")).text
                    if 'terrace_runtime_queue_depth{model="tight"} 1.0' in text:
                        break
                else:
                    raise AssertionError(f"the second request never queued:\n{text}")
                rejected = await client.post(
                    "/v1/completions", json={**body, "stream": False, "max_tokens": 1}
                )
            # The long stream is closed: the queued request runs and completes.
            assert (await queued).status_code == 200
            return rejected

    r = asyncio.run(scenario())
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    errors = s.metrics()["terrace_runtime_errors"]
    assert any(lbl["kind"] == "queue_full" and v >= 1 for _, lbl, v in errors)
    # Closing the million-token stream cancelled it: nothing stays in flight.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        inflight = s.metrics()["terrace_runtime_inflight_requests"]
        if inflight[0][2] == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a disconnected stream kept generating")


# --- torch runtime ---------------------------------------------------------------


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def test_torch_text_model_serves_openai(servers: dict[str, Server]) -> None:
    s = servers["text-torch"]
    meta = httpx.get(s.url + "/v2/models/large").json()
    assert meta["platform"] == "pytorch_torchscript"
    # CUDA when present, else CPU.
    assert meta["parameters"]["device"] == ("cuda:0" if _cuda_available() else "cpu")
    resp = _client(s).chat.completions.create(
        model="large",
        messages=[{"role": "user", "content": "Explain"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
    )
    assert resp.choices[0].logprobs is not None
    assert resp.usage.completion_tokens == len(resp.choices[0].logprobs.content)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_torch_runtime_uses_cuda(demo_models: Path, tmp_path: Path) -> None:
    server = Server(
        "gpu",
        [
            "--model",
            str(demo_models / "text-large.pt2"),
            "--format",
            "torch",
            "--device",
            "cuda",
            "--name",
            "large",
        ],
        tmp_path,
    )
    try:
        server.wait()
        meta = httpx.get(server.url + "/v2/models/large").json()
        assert meta["parameters"]["device"].startswith("cuda")
        resp = _client(server).completions.create(
            model="large", prompt="Return", max_tokens=4, temperature=0
        )
        assert resp.usage.completion_tokens >= 1
    finally:
        server.stop()
