"""Real language models end to end, no cluster: Gemma 3 270M (base) served by
Terrace's onnxruntime-genai runtime (int4), Terrace's transformers runtime
(fp32) and llama.cpp's own `llama-server` (Q4_K_M GGUF), each as a real
process on 127.0.0.1, and Terrace's router in front of them.

The model and llama-server come from `make deps` (hack/real_models.py,
hack/build-llama-server.sh); the fixtures call the same scripts, which are
no-ops when warm.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from localproc import ServerProcess as Proc
from operator_harness import wait_for
from prometheus_client.parser import text_string_to_metric_families
from terrace_router.app import create_app
from terrace_router.config import RouterConfig

ROOT = Path(__file__).resolve().parents[2]
QA_TEMPLATE = ROOT / "runtime" / "terrace_runtime" / "chat_templates" / "qa.jinja"
# The base model answers completion-style questions ("... is Paris."), not chat.
FEW_SHOT = "Q: What is the capital of France?\nA:"


def runtime(name: str, folder: Path, fmt: str, logs: Path, *extra: str) -> Proc:
    def argv(port: int) -> list[str]:
        return [
            sys.executable, "-m", "terrace_runtime.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--model", str(folder), "--format", fmt, "--name", name,
            "--threads", "1", "--chat-template", "qa", *extra,
        ]  # fmt: skip

    return Proc(name, argv(0), 0, "/v2/health/ready", logs / f"{name}.log")


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "real_models.py")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {k: Path(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@pytest.fixture(scope="module")
def llama_server_bin() -> Path:
    done = subprocess.run(
        ["bash", str(ROOT / "hack" / "build-llama-server.sh")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def servers(
    models: dict[str, Path], llama_server_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Proc]]:
    logs = tmp_path_factory.mktemp("real-model-logs")
    llama = Proc(
        "llama",
        [
            str(llama_server_bin), "-m", str(models["gguf"]), "--host", "127.0.0.1",
            "--port", "0", "-t", "1", "-c", "4096", "-np", "4", "-a", "gemma-llama",
            "--chat-template-file", str(QA_TEMPLATE), "--metrics",
        ],
        0, "/health", logs / "llama.log",
    )  # fmt: skip
    procs = {
        "onnx": runtime("gemma-onnx", models["onnx"], "onnx", logs, "--max-batch-size", "8"),
        "torch": runtime("gemma-torch", models["torch"], "torch", logs, "--device", "cpu"),
        "llama": llama,
    }
    try:
        for p in procs.values():
            p.wait()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


KINDS = ["onnx", "torch", "llama"]
MODEL = {"onnx": "gemma-onnx", "torch": "gemma-torch", "llama": "gemma-llama"}


@pytest.mark.parametrize("kind", KINDS)
def test_few_shot_completion_answers_paris(servers, kind):
    c = client(servers[kind].url)
    out = c.completions.create(
        model=MODEL[kind], prompt=FEW_SHOT, max_tokens=10, temperature=0, stop=[".", "\n"]
    )
    assert "Paris" in out.choices[0].text, out
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens >= 10 and 1 <= out.usage.completion_tokens <= 10


@pytest.mark.parametrize("kind", KINDS)
def test_chat_with_the_qa_template_answers_paris(servers, kind):
    c = client(servers[kind].url)
    out = c.chat.completions.create(
        model=MODEL[kind],
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=10,
        temperature=0,
        stop=["\n"],
    )
    assert "Paris" in out.choices[0].message.content, out


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_with_the_openai_client(servers, kind):
    c = client(servers[kind].url)
    stream = c.completions.create(
        model=MODEL[kind],
        prompt=FEW_SHOT,
        max_tokens=10,
        temperature=0,
        stop=[".", "\n"],
        stream=True,
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert "Paris" in text
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) >= 2  # streamed, not one
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_runtime_no_chat_template_is_a_clear_400(models, tmp_path):
    def argv(port: int) -> list[str]:
        return [
            sys.executable, "-m", "terrace_runtime.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--model", str(models["onnx"]), "--format", "onnx",
            "--name", "plain", "--threads", "1",
        ]  # fmt: skip

    plain = Proc("plain", argv(0), 0, "/v2/health/ready", tmp_path / "plain.log").wait()
    try:
        r = httpx.post(
            plain.url + "/v1/chat/completions",
            json={"model": "plain", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages"
        assert "no chat template" in r.json()["error"]["message"]
        # The completions API still serves the base model.
        r = httpx.post(
            plain.url + "/v1/completions",
            json={"model": "plain", "prompt": FEW_SHOT, "max_tokens": 8, "temperature": 0},
        )
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]
    finally:
        plain.stop()


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_runtime_logprobs_in_chat_and_legacy_shapes(servers, kind):
    url = servers[kind].url
    r = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": MODEL[kind],
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
        },
        timeout=60,
    ).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    text = bytes(b for t in content for b in (t["bytes"] or [])).decode()
    assert text == r["choices"][0]["message"]["content"]
    for t in content:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert t["logprob"] == pytest.approx(t["top_logprobs"][0]["logprob"])
    legacy = httpx.post(
        url + "/v1/completions",
        json={"model": MODEL[kind], "prompt": FEW_SHOT, "max_tokens": 5, "temperature": 0,
              "logprobs": 2},
        timeout=60,
    ).json()["choices"][0]  # fmt: skip
    lp = legacy["logprobs"]
    assert "".join(lp["tokens"]) == legacy["text"]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert all(len(top) == 2 for top in lp["top_logprobs"])


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_stop_strings_max_tokens_and_usage(servers, kind):
    c = client(servers[kind].url)
    out = c.completions.create(
        model=MODEL[kind], prompt=FEW_SHOT, max_tokens=12, temperature=0, stop=["Paris"]
    )
    assert "Paris" not in out.choices[0].text and out.choices[0].finish_reason == "stop"
    out = c.completions.create(model=MODEL[kind], prompt=FEW_SHOT, max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def test_seeded_sampling_repeats_and_seeds_differ(servers):
    c = client(servers["onnx"].url)

    def sample(seed: int) -> str:
        return c.completions.create(
            model="gemma-onnx", prompt="Once upon a time", max_tokens=12, temperature=1.0,
            seed=seed,
        ).choices[0].text  # fmt: skip

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_any_temperature_in_range_is_served(servers, kind):
    """A tiny temperature (OpenAI's range is 0-2) once failed with "Probabilities
    contain NaN": below 1e-5 it decodes greedily, so it answers what 0 does."""
    url = servers[kind].url + "/v1/completions"

    def text(**body: Any) -> str:
        r = httpx.post(
            url,
            json={"model": MODEL[kind], "prompt": FEW_SHOT, "max_tokens": 6, "seed": 3, **body},
            timeout=120,
        )
        assert r.status_code == 200, (body, r.text)
        return r.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    for temperature in (1e-38, 1e-300, 5e-324):
        assert text(temperature=temperature) == greedy
        assert text(temperature=temperature, top_p=0.5, logprobs=2) == greedy
    text(temperature=2.0)
    text(temperature=2.0, top_p=1e-300)


def test_concurrent_requests_each_get_their_own_answer(servers):
    """Sequences stepped together keep their own KV caches: each concurrent
    greedy answer equals the same prompt's answer alone."""
    url = servers["onnx"].url
    prompts = [f"Q: What is the capital of {c}?\nA:" for c in ("France", "Spain", "Japan", "Egypt")]

    def ask(prompt: str) -> str:
        body = {"model": "gemma-onnx", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        return httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0][
            "text"
        ]

    alone = [ask(p) for p in prompts]
    together: list[str | None] = [None] * len(prompts)

    def run(i: int) -> None:
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert "Paris" in alone[0]


def test_client_disconnect_stops_generation(servers):
    p = servers["onnx"]
    served = _answers_with_status(p, "200")
    tokens0 = p.metric("terrace_runtime_tokens_generated_total")
    with httpx.stream(
        "POST",
        p.url + "/v1/completions",
        json={"model": "gemma-onnx", "prompt": "Once", "max_tokens": 2000, "stream": True,
              "ignore_eos": True},
        timeout=60,
    ) as r:  # fmt: skip
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    # A stream had sent its 200: it is counted once, as that, when it ends.
    wait_for(lambda: _answers_with_status(p, "200") == served + 1, 30,
             what="the stream counted once it ended")  # fmt: skip
    assert p.metric("terrace_runtime_tokens_generated_total") - tokens0 < 2000
    assert_only_new_requests_generate(p, "onnx")


def assert_only_new_requests_generate(p: Proc, kind: str) -> None:
    """Nothing left generating in the background: the token counter moves by
    exactly the tokens of one new request (a leaked generation would add its
    own while this one runs)."""
    assert p.metric("terrace_runtime_inflight_requests") == 0
    before = p.metric("terrace_runtime_tokens_generated_total")
    body = {"model": MODEL[kind], "prompt": "Once", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(p.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    assert p.metric("terrace_runtime_tokens_generated_total") - before == 8


def _answers_with_status(p: Proc, status: str) -> float:
    text = httpx.get(p.url + "/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "terrace_runtime_requests_total" and s.labels.get("status") == status
    )


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_client_disconnect_stops_non_streaming_generation(servers, kind):
    """A client that leaves a plain (not streamed) completion, nothing sent
    yet, cancels it too: the token count stops well short of max_tokens and
    the request is counted once, as 499 (client closed request)."""
    p = servers[kind]
    body = json.dumps(
        {"model": MODEL[kind], "prompt": "Once", "max_tokens": 4000, "ignore_eos": True}
    ).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    closed, served = _answers_with_status(p, "499"), _answers_with_status(p, "200")
    tokens0 = p.metric("terrace_runtime_tokens_generated_total")
    with socket.create_connection(("127.0.0.1", p.port)) as conn:
        conn.sendall(head + body)
        deadline = time.monotonic() + 60
        while p.metric("terrace_runtime_tokens_generated_total") - tokens0 < 8:
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.2)
    wait_for(lambda: _answers_with_status(p, "499") == closed + 1, 30,
             what="the request counted once, as 499")  # fmt: skip
    assert p.metric("terrace_runtime_tokens_generated_total") - tokens0 < 1000
    assert _answers_with_status(p, "200") == served
    assert_only_new_requests_generate(p, kind)


def test_runtime_counts_tokens_and_joules_for_energy_per_token(servers):
    p = servers["onnx"]
    tokens0 = p.metric("terrace_runtime_tokens_generated_total")
    joules0 = p.metric("terrace_runtime_energy_joules_total")
    client(p.url).completions.create(
        model="gemma-onnx", prompt=FEW_SHOT, max_tokens=6, temperature=0, extra_body={
            "ignore_eos": True}
    )  # fmt: skip
    tokens = p.metric("terrace_runtime_tokens_generated_total") - tokens0
    joules = p.metric("terrace_runtime_energy_joules_total") - joules0
    assert tokens >= 6 and joules > 0


def test_a_folder_of_the_wrong_form_is_not_ready_with_the_reason(models, tmp_path):
    def argv(port: int) -> list[str]:
        return [
            sys.executable, "-m", "terrace_runtime.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--model", str(models["torch"]), "--format", "onnx",
        ]  # fmt: skip

    p = Proc("wrong", argv(0), 0, "/v2/health/live", tmp_path / "wrong.log").wait()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            body = httpx.get(p.url + "/readyz").json()
            if body.get("status") == "failed":
                break
            time.sleep(0.3)
        assert body["status"] == "failed"
        assert "not an onnxruntime-genai folder" in body["reason"]
        assert "terrace-runtime convert" in body["reason"]
    finally:
        p.stop()


# -- the router in front of real servers --------------------------------------


class RouterThread:
    """The router app under uvicorn in a thread, on a socket already bound to a
    port the OS picked."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(RouterConfig.model_validate(cfg))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> RouterThread:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, interval=0.05, what="the router started")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def router_config(servers: dict[str, Proc], **escalation: Any) -> dict[str, Any]:
    return {
        "name": "auto",
        "tiers": [
            {
                "name": "small-cpu",
                "endpoints": [servers["onnx"].url],
                "upstreamModel": "gemma-onnx",
            },
            {"name": "medium", "endpoints": [servers["torch"].url], "upstreamModel": "gemma-torch"},
            {"name": "llama", "endpoints": [servers["llama"].url], "upstreamModel": "gemma-llama"},
        ],  # fmt: skip
        "calibration": {"thresholds": [2.0, 3.0]},  # every prompt starts on small-cpu
        "escalation": escalation,
        "cache": {"enabled": False},
    }


@pytest.mark.parametrize("tier", ["small-cpu", "medium", "llama"])
def test_router_reaches_each_real_server_and_streams(servers, tier):
    with RouterThread(router_config(servers, onLowConfidence=False)) as router:
        c = client(router.url)
        raw = c.completions.with_raw_response.create(
            model=tier, prompt=FEW_SHOT, max_tokens=10, temperature=0, stop=["\n"]
        )
        assert raw.headers["x-terrace-tier"] == tier
        assert "Paris" in raw.parse().choices[0].text
        stream = c.chat.completions.create(
            model=tier,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=10, temperature=0, stop=["\n"], stream=True,
        )  # fmt: skip
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert "Paris" in text


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_low_confidence_answer_escalates_on_real_logprobs(servers, kind):
    """With the bar above what the small model reaches on an open question,
    the router re-asks the next tier and says why; llama.cpp's logprobs (chat
    shape on both APIs) are read the same way as Terrace's."""
    cfg = router_config(servers, minMeanLogprob=-0.05)
    cfg["tiers"] = [cfg["tiers"][0], cfg["tiers"][2]]
    cfg["calibration"] = {"thresholds": [2.0]}
    with RouterThread(cfg) as router:
        c = client(router.url)
        if kind == "chat":
            raw = c.chat.completions.with_raw_response.create(
                model="auto",
                messages=[{"role": "user", "content": "Write a short poem about rain."}],
                max_tokens=8,
                temperature=0,
            )
            body = raw.parse()
            assert body.choices[0].message.content
            assert body.choices[0].logprobs is None  # the logprobs the router added are gone
        else:
            raw = c.completions.with_raw_response.create(
                model="auto", prompt="Write a short poem about rain.\n", max_tokens=8,
                temperature=0,
            )  # fmt: skip
            assert raw.parse().choices[0].text
        assert raw.headers["x-terrace-escalated"] == "low_confidence"
        assert raw.headers["x-terrace-tier"] == "llama"

    # And the same request under the default bar stays on the cheap tier.
    cfg["escalation"] = {}
    with RouterThread(cfg) as router:
        raw = client(router.url).completions.with_raw_response.create(
            model="auto", prompt=FEW_SHOT, max_tokens=4, temperature=0
        )
        assert raw.headers["x-terrace-tier"] == "small-cpu"
        assert "x-terrace-escalated" not in raw.headers


def test_the_prepared_models_are_what_the_manifest_says(models):
    from terrace_runtime.convert import read_manifest

    for form, folder in (("torch", models["torch"]), ("onnx-int4", models["onnx"])):
        manifest = read_manifest(folder)
        assert manifest is not None and manifest["form"] == form
    assert (models["onnx"] / "genai_config.json").exists()
    assert os.stat(models["onnx"]).st_mode & 0o055  # readable by a pod's other user


def test_batched_onnx_decoding_matches_onnxruntime_genai(models):
    """Rows of different lengths joining a running batch at different steps
    give token for token what onnxruntime-genai's own generator gives each
    alone (greedy)."""
    import numpy as np
    from terrace_runtime.generation import SamplingParams, Sequence_
    from terrace_runtime.hf_tokenizer import HFTokenizer
    from terrace_runtime.language_models import BatchedOnnxDecoder, OgaDecoder

    tok = HFTokenizer(models["onnx"])
    prompts = [FEW_SHOT, "Once upon a time", "Q: Why is the sky blue?\nA:", "The history of"]

    def seq(prompt: str) -> Sequence_:
        ids = tok.encode(prompt)
        return Sequence_(ids, len(ids), SamplingParams(max_tokens=40), None, None)  # type: ignore[arg-type]

    def greedy(decoder: Any, seqs: list[Sequence_], steps: int, stagger: int = 0) -> None:
        """Sequence i joins at step i * stagger; every joined sequence steps each time."""
        for step in range(steps):
            active = [s for i, s in enumerate(seqs) if step >= i * stagger]
            for s, row in zip(active, decoder.logits(active), strict=True):
                s.generated.append(int(np.argmax(row)))

    alone = [seq(p) for p in prompts]
    oga = OgaDecoder(models["onnx"], device="cpu", threads=1)
    for s in alone:
        greedy(oga, [s], 14)
    batched = BatchedOnnxDecoder(models["onnx"], threads=1)
    together = [seq(p) for p in prompts]
    greedy(batched, together, 13, stagger=3)
    assert [len(s.generated) for s in together] == [13, 10, 7, 4]
    assert [s.generated for s in together] == [
        a.generated[: len(s.generated)] for s, a in zip(together, alone, strict=True)
    ]
    # Rows that finished leave (the last row moves into a freed slot); the
    # others go on exactly as they would alone.
    together[1].state = together[3].state = None
    rest = [together[0], together[2]]
    for s, row in zip(rest, batched.logits(rest), strict=True):
        s.generated.append(int(np.argmax(row)))
    assert [s.generated for s in rest] == [alone[0].generated, alone[2].generated[:8]]
    assert len(batched.rows) == 2


def test_batched_torch_decoding_matches_one_sequence_at_a_time(models):
    """transformers: rows of different lengths, left-padded into one batch
    each step and joining mid-way, give the tokens each gives alone (greedy;
    fp32 padding changes the sums' order, so logits agree to a tolerance)."""
    import numpy as np
    from terrace_runtime.generation import SamplingParams, Sequence_
    from terrace_runtime.hf_tokenizer import HFTokenizer
    from terrace_runtime.language_models import TransformersDecoder

    tok = HFTokenizer(models["torch"])
    prompts = [FEW_SHOT, "Once upon a time", "Q: Why is the sky blue?\nA:"]
    decoder = TransformersDecoder(models["torch"], device="cpu", threads=1)

    def seq(prompt: str) -> Sequence_:
        ids = tok.encode(prompt)
        return Sequence_(ids, len(ids), SamplingParams(max_tokens=40), None, None)  # type: ignore[arg-type]

    def run(seqs: list[Sequence_], steps: int, stagger: int) -> list[np.ndarray]:
        last: list[np.ndarray] = []
        for step in range(steps):
            active = [s for i, s in enumerate(seqs) if step >= i * stagger]
            last = list(decoder.logits(active))
            for s, row in zip(active, last, strict=True):
                s.generated.append(int(np.argmax(row)))
        return last

    alone = [seq(p) for p in prompts]
    alone_last = [run([s], 8 - 2 * i, 0)[0] for i, s in enumerate(alone)]
    together = [seq(p) for p in prompts]
    together_last = run(together, 8, 2)
    assert [s.generated for s in together] == [s.generated for s in alone]
    for a, b in zip(alone_last, together_last, strict=True):
        assert np.allclose(a, b, atol=1e-3), np.abs(a - b).max()


def test_request_edge_cases_from_a_new_user_trial(servers):
    p = servers["onnx"]
    url = p.url + "/v1/completions"

    def post(**body: Any) -> httpx.Response:
        return httpx.post(url, json={"model": "gemma-onnx", **body}, timeout=120)

    # Any integer seed (OpenAI's range), not a 500 for a negative one.
    r = post(prompt="Once", max_tokens=3, temperature=1.0, seed=-5)
    assert r.status_code == 200, r.text
    # n > 1 with a seed: different choices, the same set again for the same seed.
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 42}
    first = [c["text"] for c in post(**body).json()["choices"]]
    assert len(set(first)) > 1 and [c["text"] for c in post(**body).json()["choices"]] == first
    # An explicit null max_tokens is the completions default (16), not chat's.
    r = post(prompt="Once", max_tokens=None, ignore_eos=True).json()
    assert r["usage"]["completion_tokens"] == 16
    # echo spells a token-id prompt.
    r = post(prompt=[2, 818, 5279], max_tokens=2, temperature=0, echo=True).json()
    assert r["choices"][0]["text"].startswith("The capital")
    # A stop string inside a token: the logprob tokens spell exactly the text.
    r = post(prompt=FEW_SHOT, max_tokens=12, temperature=0, stop=["Par"], logprobs=1).json()
    choice = r["choices"][0]
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert choice["text"].endswith("is ")
    # A request refused on its second prompt leaves nothing generating.
    r = post(prompt=["hi", "hello " * 40000], max_tokens=2000, ignore_eos=True)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert_only_new_requests_generate(p, "onnx")
