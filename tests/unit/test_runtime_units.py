"""terrace-runtime's pure parts: cgroup CPU limits, model URIs, OIP v2 tensor
codecs, the dynamic batcher, the generation engine, int8 quantization."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from served import until
from terrace_runtime.batching import QueueFull, TensorBatcher, retry_after_seconds
from terrace_runtime.cgroup import cgroup_cpu_limit, parse_cfs, parse_cpu_max, threads_for
from terrace_runtime.generation import (
    ByteDecoder,
    ByteTokenizer,
    FinishEvent,
    GenerationEngine,
    SamplingParams,
    TokenEvent,
    choose_token,
    cut_at_stop,
    find_stop,
    log_softmax,
    safe_release,
    sample_row,
)
from terrace_runtime.metrics import CpuPowerModel, RuntimeMetrics
from terrace_runtime.quantize import quantize_int8, quantized_path
from terrace_runtime.settings import ServeSettings
from terrace_runtime.tensors import (
    InvalidRequest,
    TensorSpec,
    decode_inputs,
    decode_outputs,
    encode_output,
)
from terrace_runtime.uris import ModelURIError, parse_model_uri, resolve_model_uri

# --- cgroup ---------------------------------------------------------------------


def test_cpu_max_parsing() -> None:
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("50000 100000") == 0.5
    assert parse_cfs("-1", "100000") is None
    assert parse_cfs("200000\n", "100000\n") == 2.0


def test_threads_round_up_and_respect_affinity() -> None:
    assert threads_for(None, 8) == 8
    assert threads_for(1.5, 8) == 2
    assert threads_for(0.2, 8) == 1
    assert threads_for(16, 4) == 4


def test_cgroup_v2_limit_from_own_cgroup(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    pod = tmp_path / "kubepods" / "pod1"
    pod.mkdir(parents=True)
    (pod / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1\n") == 2.5
    # Inside a cgroup namespace the container's cgroup is the mount's root.
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("50000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path, "3:cpu,cpuacct:/\n") == 0.5


def test_no_cgroup_files_means_unlimited(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path, "") is None


# --- model URIs -----------------------------------------------------------------


def test_uri_parsing() -> None:
    assert parse_model_uri("/models/a.onnx").location == "/models/a.onnx"
    assert parse_model_uri("file:///models/a.onnx").location == "/models/a.onnx"
    pvc = parse_model_uri("pvc://models-claim/tiers/small.onnx")
    assert (pvc.scheme, pvc.location) == ("pvc", "models-claim/tiers/small.onnx")
    digest = "ab" * 32
    http = parse_model_uri(f"https://example.test/m.onnx#sha256={digest}")
    assert (http.location, http.sha256) == ("https://example.test/m.onnx", digest)
    assert parse_model_uri("http://h/m.onnx", sha256=digest.upper()).sha256 == digest


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/model.onnx", "unsupported model URI scheme 's3'"),
        ("hf://org/model", "unsupported model URI scheme 'hf'"),
        ("pvc://claim-only", "pvc://<claim>/<path>"),
        ("https://h/m.onnx#sha256=xyz", "64 hex"),
        ("https://h/m.onnx#md5=abc", "#sha256"),
        ("file://otherhost/m.onnx", "local path"),
        ("", "empty"),
    ],
)
def test_bad_uris_fail_clearly(uri: str, message: str) -> None:
    with pytest.raises(ModelURIError, match=message.replace("(", r"\(").replace("'", "'")):
        parse_model_uri(uri)


def test_resolve_file_and_pvc(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    common = {"cache_dir": tmp_path / "cache", "pvc_root": tmp_path}
    assert resolve_model_uri(str(model), **common) == model
    with pytest.raises(ModelURIError, match="model file not found"):
        resolve_model_uri(str(tmp_path / "absent.onnx"), **common)
    # pvc://claim/path: the claim mounted at the root, or under root/<claim>.
    assert resolve_model_uri("pvc://claim/m.onnx", **common) == model
    (tmp_path / "claim2").mkdir()
    (tmp_path / "claim2" / "x.onnx").write_bytes(b"x")
    assert resolve_model_uri("pvc://claim2/x.onnx", **common) == tmp_path / "claim2" / "x.onnx"
    with pytest.raises(ModelURIError, match="tried"):
        resolve_model_uri("pvc://claim/none.onnx", **common)
    with pytest.raises(ModelURIError, match="sha256 mismatch"):
        resolve_model_uri(str(model), sha256="0" * 64, **common)


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_http_download_checks_sha_and_caches(http_dir: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_dir
    (root / "m.onnx").write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(b"weights" * 1000).hexdigest()
    cache = tmp_path / "cache"
    path = resolve_model_uri(f"{base}/m.onnx#sha256={digest}", cache_dir=cache, pvc_root=tmp_path)
    assert path.read_bytes() == b"weights" * 1000 and cache in path.parents
    # Cached: served again even when the origin is gone.
    (root / "m.onnx").unlink()
    again = resolve_model_uri(f"{base}/m.onnx", cache_dir=cache, pvc_root=tmp_path, sha256=digest)
    assert again == path
    with pytest.raises(ModelURIError, match="HTTP 404"):
        resolve_model_uri(f"{base}/other.onnx", cache_dir=cache, pvc_root=tmp_path)
    (root / "bad.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelURIError, match="sha256 mismatch"):
        resolve_model_uri(f"{base}/bad.onnx", cache_dir=cache, pvc_root=tmp_path, sha256=digest)
    assert not any(p.name == "bad.onnx" for p in cache.rglob("*"))  # nothing half-trusted left


# --- settings ---------------------------------------------------------------------


def test_settings_defaults_and_checks() -> None:
    s = ServeSettings(model="pvc://c/tiers/small-cpu.onnx#sha256=" + "a" * 64, format="onnx")
    assert s.name == "small-cpu" and s.resolved_device() == "cpu" and s.port == 8080
    assert ServeSettings(model="m.pt2", format="torch").resolved_device() == "auto"
    with pytest.raises(ValueError, match="ONNX models only"):
        ServeSettings(model="m.pt2", format="torch", quantize="int8")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERRACE_RUNTIME_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TERRACE_RUNTIME_WATTS_PER_CORE", "4.5")
    s = ServeSettings(model="m.onnx", format="onnx")
    assert (s.max_batch_size, s.watts_per_core) == (7, 4.5)


# --- OIP v2 tensors ---------------------------------------------------------------

SPECS = (TensorSpec("x", "FP32", (-1, 3)), TensorSpec("flag", "BOOL", (-1,)))


def _item(name: str, datatype: str, shape: list[int], data: object) -> dict[str, object]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def test_decode_valid_request() -> None:
    body = {
        "inputs": [
            _item("x", "FP32", [2, 3], [1, 2, 3, 4, 5, 6]),
            _item("flag", "BOOL", [2], [True, False]),
        ],
        "outputs": [{"name": "y"}],
    }
    arrays = decode_inputs(body, SPECS)
    assert arrays["x"].dtype == np.float32 and arrays["x"].shape == (2, 3)
    assert arrays["flag"].dtype == np.bool_
    assert decode_outputs(body, [TensorSpec("y", "FP32", (-1,))]) == {"y": False}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([_item("x", "FP32", [2, 3], [0.0] * 6)], "missing inputs"),
        (
            [_item("x", "FP32", [2, 3], [0.0] * 6), _item("flag", "BOOL", [3], [True] * 3)],
            "batch dimension",
        ),
        (
            [_item("x", "INT32", [1, 3], [1, 2, 3]), _item("flag", "BOOL", [1], [True])],
            "does not match",
        ),
        ([_item("x", "FP32", [1, 3], [1, 2, 3]), _item("flag", "BOOL", [1], [1])], "true/false"),
        ([_item("x", "FP32", [1, -3], [1, 2, 3])], "non-negative"),
        ([_item("x", "FP99", [1, 3], [1, 2, 3])], "unknown datatype"),
    ],
)
def test_decode_rejects(inputs: list[dict[str, object]], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_inputs({"inputs": inputs}, SPECS)


def test_integer_inputs_refuse_floats_and_overflow() -> None:
    with pytest.raises(InvalidRequest, match="integers"):
        decode_inputs(
            {"inputs": [_item("ids", "INT64", [2], [1.5, 2])]}, [TensorSpec("ids", "INT64", (-1,))]
        )
    with pytest.raises(InvalidRequest, match="out of range"):
        decode_inputs(
            {"inputs": [_item("px", "UINT8", [2], [300, 2])]}, [TensorSpec("px", "UINT8", (-1,))]
        )


def test_unknown_output_and_bytes_roundtrip() -> None:
    with pytest.raises(InvalidRequest, match="unknown outputs"):
        decode_outputs({"outputs": [{"name": "z"}]}, SPECS)
    arrays = decode_inputs(
        {"inputs": [_item("s", "BYTES", [2], ["a", "b"])]}, [TensorSpec("s", "BYTES", (-1,))]
    )
    assert encode_output("s", arrays["s"]) == {
        "name": "s",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["a", "b"],
    }


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from(["FP32", "FP64", "INT32", "INT64", "UINT8", "BOOL"]),
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_encode_decode_roundtrip(dtype: str, shape: list[int], seed: int) -> None:
    from terrace_runtime.tensors import OIP_TO_NUMPY

    rng = np.random.default_rng(seed)
    array = (rng.random(shape) * 100).astype(OIP_TO_NUMPY[dtype])
    encoded = encode_output("t", array)
    spec = TensorSpec("t", dtype, tuple(-1 for _ in shape))
    decoded = decode_inputs({"inputs": [encoded]}, [spec])
    np.testing.assert_array_equal(decoded["t"], array)
    assert decoded["t"].dtype == array.dtype


# --- dynamic batching ---------------------------------------------------------------


def _metrics() -> RuntimeMetrics:
    return RuntimeMetrics("m", CpuPowerModel(10.0))


class GatedModel:
    """Doubles its input; blocks until released, so tests control timing."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()  # the worker holds a batch
        self.batches: list[int] = []

    def __call__(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(10)
        x = inputs["x"]
        if np.isnan(x).any():
            raise ValueError("nan input")
        self.batches.append(x.shape[0])
        return {"y": x * 2}


def _batcher(model: GatedModel, executor: ThreadPoolExecutor, **kw: int | float) -> TensorBatcher:
    options: dict[str, int | float] = {"max_batch_size": 8, "max_wait_s": 0.0, "max_queue": 64}
    options.update(kw)
    return TensorBatcher(
        model, input_names=["x"], batchable=True, executor=executor, metrics=_metrics(), **options
    )  # type: ignore[arg-type]


def test_batcher_stacks_waiting_requests_and_splits_answers() -> None:
    async def scenario() -> None:
        model = GatedModel()
        with ThreadPoolExecutor(1) as pool:
            b = _batcher(model, pool)
            b.start()
            first = asyncio.create_task(b.infer({"x": np.full((1, 2), 0.0)}, ["y"]))
            await until(model.entered.is_set)  # the worker holds the first request
            rest = [
                asyncio.create_task(b.infer({"x": np.full((1, 2), float(i))}, ["y"]))
                for i in range(1, 6)
            ]
            await until(lambda: b.depth == 5)  # the rest wait together
            model.gate.set()
            results = await asyncio.gather(first, *rest)
            await b.stop()
        assert model.batches == [1, 5]
        for i, r in enumerate(results):
            np.testing.assert_array_equal(r.outputs["y"], np.full((1, 2), 2.0 * i))
        assert all(r.joules >= 0 for r in results)

    asyncio.run(scenario())


def test_batcher_full_queue_raises_queue_full_not_hang() -> None:
    async def scenario() -> None:
        model = GatedModel()
        with ThreadPoolExecutor(1) as pool:
            b = _batcher(model, pool, max_queue=2, max_batch_size=1)
            b.start()
            running = asyncio.create_task(b.infer({"x": np.zeros((1, 2))}, ["y"]))
            await until(model.entered.is_set)
            queued = [
                asyncio.create_task(b.infer({"x": np.zeros((1, 2))}, ["y"])) for _ in range(2)
            ]
            await until(lambda: b.depth == 2)
            with pytest.raises(QueueFull) as full:
                await asyncio.wait_for(b.infer({"x": np.zeros((1, 2))}, ["y"]), 1)
            assert full.value.retry_after_s >= 1
            model.gate.set()
            await asyncio.gather(running, *queued)
            await b.stop()

    asyncio.run(scenario())


def test_batcher_isolates_a_failing_request() -> None:
    async def scenario() -> None:
        model = GatedModel()
        with ThreadPoolExecutor(1) as pool:
            b = _batcher(model, pool)
            b.start()
            blocker = asyncio.create_task(b.infer({"x": np.zeros((1, 2))}, ["y"]))
            await until(model.entered.is_set)
            good = asyncio.create_task(b.infer({"x": np.ones((2, 2))}, ["y"]))
            bad = asyncio.create_task(b.infer({"x": np.full((1, 2), np.nan)}, ["y"]))
            await until(lambda: b.depth == 2)  # stacked into one batch, which fails
            model.gate.set()
            await blocker
            assert (await good).outputs["y"].shape == (2, 2)
            with pytest.raises(ValueError, match="nan"):
                await bad
            await b.stop()

    asyncio.run(scenario())


def test_batcher_waits_up_to_max_wait_for_company() -> None:
    async def company() -> list[int]:
        # A wait no test reaches: the first request goes only with company,
        # as soon as the batch is full.
        model = GatedModel()
        model.gate.set()
        with ThreadPoolExecutor(1) as pool:
            b = _batcher(model, pool, max_wait_s=600, max_batch_size=4)
            b.start()
            first = asyncio.create_task(b.infer({"x": np.zeros((1, 2))}, ["y"]))
            await until(lambda: b.depth == 1)
            assert not model.entered.is_set()  # waiting for company
            second = asyncio.create_task(b.infer({"x": np.zeros((3, 2))}, ["y"]))
            await asyncio.wait_for(asyncio.gather(first, second), 10)
            await b.stop()
        return model.batches

    async def alone() -> list[int]:
        # Nobody comes: the request goes by itself once the wait is over.
        model = GatedModel()
        model.gate.set()
        with ThreadPoolExecutor(1) as pool:
            b = _batcher(model, pool, max_wait_s=0.2)
            b.start()
            await asyncio.wait_for(b.infer({"x": np.zeros((1, 2))}, ["y"]), 10)
            await b.stop()
        return model.batches

    assert asyncio.run(company()) == [4]
    assert asyncio.run(alone()) == [1]


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after_seconds(0, 32, 0.001) == 1
    assert retry_after_seconds(320, 32, 0.5) == 6


# --- generation ---------------------------------------------------------------------


def test_tokenizer_and_token_text() -> None:
    tok = ByteTokenizer()
    assert tok.encode("hé") == [257, 104, 0xC3, 0xA9]
    assert tok.vocab_size == 259
    assert tok.token_text(ord("a")) == "a" and tok.token_text(0xC3) == "bytes:\\xc3"
    assert tok.token_text(tok.eos_id) == "<|endoftext|>"
    assert ByteTokenizer.from_metadata(tok.to_metadata()) == tok
    with pytest.raises(ValueError, match="unsupported tokenizer"):
        ByteTokenizer.from_metadata({"type": "bpe"})


def test_stop_helpers() -> None:
    assert find_stop(b"hello world", [b"wor", b"lo"]) == 3
    assert find_stop(b"hello", [b"x"]) is None
    singles = [b"x"] * 10
    assert safe_release(singles, [b"abc"]) == 8
    assert safe_release(singles, []) == 10
    # Multi-byte tokens: hold back tokens covering the last (longest stop - 1) bytes.
    pieces = [b"Hello", b" wor", b"ld", b"!"]
    assert safe_release(pieces, [b"abcd"]) == 2  # "ld!" (3 bytes) may start a stop
    assert safe_release(pieces, [b"ab"]) == 3
    # A stop string that starts inside a token keeps that token's head.
    assert cut_at_stop(pieces, [b"orl"]) == (1, b" w")
    assert cut_at_stop(pieces, [b" wor"]) == (1, b"")
    assert cut_at_stop(pieces, [b"zz"]) is None


def test_sampling() -> None:
    logprobs = log_softmax(np.log(np.array([0.1, 0.6, 0.3])))
    rng = np.random.default_rng(0)
    assert choose_token(logprobs, SamplingParams(temperature=0), rng) == 1
    # top_p 0.5 keeps only the most likely token.
    picks = {
        choose_token(logprobs, SamplingParams(temperature=1, top_p=0.5), rng) for _ in range(50)
    }
    assert picks == {1}
    picks = {choose_token(logprobs, SamplingParams(temperature=1), rng) for _ in range(200)}
    assert picks == {0, 1, 2}


# Logits as a model's float32 output can be: any finite value, huge magnitudes
# (float32's extremes), and ties (a few values drawn often).
LOGIT = st.floats(width=32, allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, 1.0, -1.0, 1e30, -1e30, 3.4028235e38, -3.4028235e38]
)
TEMPERATURE = st.floats(0.0, 2.0) | st.sampled_from(
    [0.0, 5e-324, 1e-300, 1e-38, 1e-6, 1e-5, 1e-3, 2.0]
)
TOP_P = st.floats(0.0, 1.0, exclude_min=True) | st.sampled_from([5e-324, 1e-300, 0.5, 1.0])


@settings(max_examples=400, deadline=None)
@given(
    logits=st.lists(LOGIT, min_size=1, max_size=40),
    masked=st.sets(st.integers(0, 39)),
    temperature=TEMPERATURE,
    top_p=TOP_P,
    logprobs=st.none() | st.integers(0, 5),
    seed=st.integers(0, 2**32),
)
def test_sampling_is_numerically_safe_for_every_temperature_and_top_p(
    logits: list[float],
    masked: set[int],
    temperature: float,
    top_p: float,
    logprobs: int | None,
    seed: int,
) -> None:
    """Any temperature in [0, 2] and top_p in (0, 1] over any finite logits
    (some masked to -inf, as padding and BOS are) gives a real, unmasked
    token with a finite logprob: never "Probabilities contain NaN"."""
    scores = np.array(logits, dtype=np.float32)
    hidden = sorted(i for i in masked if i < len(scores))[: len(scores) - 1]
    scores[hidden] = -np.inf
    if logprobs is not None:
        logprobs = min(logprobs, len(scores) - 1)  # alternatives come from the vocabulary
    params = SamplingParams(temperature=temperature, top_p=top_p, logprobs=logprobs)
    event = sample_row(scores.copy(), params, np.random.default_rng(seed))
    assert 0 <= event.token_id < len(scores)
    assert event.token_id not in hidden
    if temperature < 1e-5:  # greedy below vLLM's epsilon
        assert event.token_id == int(np.argmax(scores))
    if logprobs is not None or temperature >= 1e-5:
        assert math.isfinite(event.logprob) and event.logprob <= 1e-6
        assert not any(math.isnan(lp) for _, lp in event.top)


class CountingLM:
    """A real (if silly) language model: always predicts the byte after the last
    one, 'a' -> 'b' -> 'c' ...; records each step's batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.widths: list[int] = []

    def __call__(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert mask[:, -1].all()  # left padding: the last column is real
        self.batches.append(ids.shape[0])
        self.widths.append(ids.shape[1])
        logits = np.full((ids.shape[0], 259), -10.0, dtype=np.float32)
        logits[np.arange(ids.shape[0]), (ids[:, -1] + 1) % 256] = 10.0
        return {"logits": logits}


def _engine(lm: CountingLM, pool: ThreadPoolExecutor, **kw: int | float) -> GenerationEngine:
    options: dict[str, int | float] = {"max_batch_size": 4, "max_wait_s": 0.0, "max_queue": 8}
    options.update(kw)
    return GenerationEngine(
        ByteDecoder(lm, ByteTokenizer(), 6),
        tokenizer=ByteTokenizer(),
        context_length=6,
        executor=pool,
        metrics=_metrics(),
        **options,
    )  # type: ignore[arg-type]


async def _collect(
    engine: GenerationEngine, prompt: str, params: SamplingParams
) -> tuple[bytes, FinishEvent, list[TokenEvent]]:
    seq = engine.submit(engine.tokenizer.encode(prompt), params)
    tokens: list[TokenEvent] = []
    async for event in engine.events(seq):
        if isinstance(event, TokenEvent):
            tokens.append(event)
        else:
            return bytes(t.token_id for t in tokens), event, tokens
    raise AssertionError("no finish event")


def test_engine_generates_stops_and_batches() -> None:
    async def scenario() -> None:
        lm = CountingLM()
        with ThreadPoolExecutor(1) as pool:
            engine = _engine(lm, pool, max_wait_s=0.05)
            engine.start()
            greedy = SamplingParams(max_tokens=5, temperature=0, logprobs=2)
            results = await asyncio.gather(
                _collect(engine, "a", greedy),
                _collect(engine, "long prompt x", greedy),
                _collect(engine, "k", SamplingParams(max_tokens=20, temperature=0, stop=(b"no",))),
            )
            await engine.stop()
        (text_a, fin_a, toks_a), (text_b, _, _), (text_k, fin_k, _) = results
        assert text_a == b"bcdef" and fin_a.reason == "length"
        assert fin_a.completion_tokens == 5 and fin_a.prompt_tokens == 2
        assert text_b == b"yz{|}"
        assert all(len(t.top) == 2 and t.top[0][0] == t.token_id for t in toks_a)
        assert text_k == b"lm" and fin_k.reason == "stop"  # "no" is cut, never shown
        assert max(lm.batches) == 3  # all three decoded together
        assert max(lm.widths) == 6  # the context window caps the time axis

    asyncio.run(scenario())


def test_engine_queue_bound() -> None:
    async def scenario() -> None:
        lm = CountingLM()
        with ThreadPoolExecutor(1) as pool:
            engine = _engine(lm, pool, max_queue=1, max_batch_size=1)
            # Not started: nothing leaves the queue.
            engine.submit([257], SamplingParams())
            with pytest.raises(QueueFull):
                engine.submit([257], SamplingParams())
            await engine.stop()

    asyncio.run(scenario())


# --- int8 quantization ----------------------------------------------------------------


def _matmul_model(path: Path) -> None:
    weight = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="terrace", value='{"task": "tensor"}')
    onnx.save(model, str(path))


def test_int8_quantization_cached_beside_model(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    _matmul_model(source)
    out = quantize_int8(source, tmp_path / "cache")
    assert out == tmp_path / "m.int8.onnx"
    assert out.stat().st_size < source.stat().st_size
    quantized = onnx.load(str(out))
    assert {p.key: p.value for p in quantized.metadata_props}["terrace"] == '{"task": "tensor"}'
    assert any(
        n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in quantized.graph.node
    )
    mtime = out.stat().st_mtime_ns
    assert quantize_int8(source, tmp_path / "cache") == out
    assert out.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_int8_goes_to_cache_when_model_dir_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "ro"
    models.mkdir()
    _matmul_model(models / "m.onnx")
    # A read-only PVC mount; os.access is what the runtime asks (root ignores chmod).
    monkeypatch.setattr("terrace_runtime.quantize.os.access", lambda p, mode: Path(p) != models)
    target = quantize_int8(models / "m.onnx", tmp_path / "cache")
    assert tmp_path / "cache" in target.parents and target.is_file()
    assert not (models / "m.int8.onnx").exists()
    assert quantized_path(models / "m.onnx", tmp_path / "cache") == target


def test_cpu_power_model() -> None:
    assert CpuPowerModel(12.0).joules(0.5) == 6.0
    assert CpuPowerModel(12.0).joules(-1) == 0.0
    m = RuntimeMetrics("x", CpuPowerModel(10.0))
    assert m.observe_batch(4, wall_s=0.1, cpu_s=0.2) == pytest.approx(2.0)
    assert RuntimeMetrics("y", None).observe_batch(4, 0.1, 0.2) == 0.0


def test_metrics_registries_are_per_app() -> None:
    a, b = RuntimeMetrics("same", None), RuntimeMetrics("same", None)
    a.error("queue_full")
    assert (
        a.registry.get_sample_value(
            "terrace_runtime_errors_total", {"model": "same", "kind": "queue_full"}
        )
        == 1.0
    )
    assert (
        b.registry.get_sample_value(
            "terrace_runtime_errors_total", {"model": "same", "kind": "queue_full"}
        )
        is None
    )
