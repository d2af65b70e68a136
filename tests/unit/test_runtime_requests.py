"""The OpenAI request rules of terrace-runtime, on the validators alone and
through a served byte-level model:

- an explicit null in any optional field is the field's default;
- strict types and ranges, and a bad field is a 400 naming OpenAI's `param`;
- unknown fields are refused, unimplemented OpenAI fields pass only as no-ops;
- bodies that are not a JSON object (or JSON at all) are 400s;
- unknown paths and wrong methods answer in the path's protocol;
- `invalid_type` only for the wrong JSON type, `invalid_value` for a value
  out of range (integers of any size);
- every temperature and top_p in range is served (tiny ones decode greedily);
- a request of more sequences than the queue can ever hold is a 400;
- a stream that breaks ends with an in-band error event and no `[DONE]`;
- hypothesis: any JSON object validates or gives a 400 whose `param` is a
  real key path of the body, never a 500.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_harness import MODEL, ServedRuntime, build_byte_model
from terrace_runtime.openai_requests import (
    ChatRequest,
    CompletionRequest,
    ContentPart,
    InvalidRequest,
    Message,
    StreamOptions,
    parse,
)

COMPLETION = {"model": MODEL, "prompt": "Hello"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
BASE: dict[type, dict[str, Any]] = {
    CompletionRequest: COMPLETION,
    ChatRequest: CHAT,
    Message: {"role": "user"},
    StreamOptions: {},
    ContentPart: {"type": "text", "text": "x"},
}
ENDPOINT = {CompletionRequest: "/v1/completions", ChatRequest: "/v1/chat/completions"}


def _optional_fields(*models: type) -> list[tuple[type, str]]:
    return [
        (model, name)
        for model in models
        for name, info in model.model_fields.items()
        if not info.is_required()
    ]


OPTIONAL = _optional_fields(*BASE)


def _id(value: Any) -> str:
    return value.__name__ if isinstance(value, type) else json.dumps(value)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedRuntime]:
    with ServedRuntime(build_byte_model(tmp_path_factory.mktemp("byte-model"))) as served:
        yield served


def _rejects(model: type, body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(model, body)
    return caught.value


# --- the null rule ------------------------------------------------------------


def test_every_optional_field_is_covered():
    names = {name for _, name in OPTIONAL}
    for expected in (
        "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
        "logprobs", "top_logprobs", "echo", "max_completion_tokens", "ignore_eos",
        "presence_penalty", "tools", "content", "include_usage",
    ):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize(("model", "name"), OPTIONAL, ids=_id)
def test_null_is_the_default(model, name):
    base = BASE[model]
    assert name not in base
    assert parse(model, {**base, name: None}) == parse(model, base)


@pytest.mark.parametrize(
    ("model", "name"),
    _optional_fields(CompletionRequest, ChatRequest),
    ids=_id,
)
def test_null_answers_like_omitting(runtime, model, name):
    """Over HTTP: the same answer (seeded sampling) with the field null or absent."""
    base = {**BASE[model], "max_tokens": 5, "seed": 7, "temperature": 0.9}
    if name == "seed":
        base["temperature"] = 0  # unseeded sampling differs run to run
    base.pop(name, None)

    def answer(body: dict[str, Any]) -> Any:
        r = httpx.post(runtime.url + ENDPOINT[model], json=body, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        return out["choices"], out["usage"]

    assert answer({**base, name: None}) == answer(base)


def test_null_max_tokens_is_the_completions_default_of_16(runtime):
    r = httpx.post(
        runtime.url + "/v1/completions",
        json={**COMPLETION, "max_tokens": None, "ignore_eos": True},
        timeout=30,
    )
    assert r.json()["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(
    ("model", "name"),
    [(m, n) for m in (CompletionRequest, ChatRequest) for n in BASE[m]],
    ids=_id,
)
def test_null_in_a_required_field_is_refused(model, name):
    assert model.model_fields[name].is_required()
    err = _rejects(model, {**BASE[model], name: None})
    assert err.param == name


# --- strict types and ranges ------------------------------------------------------

BAD = [
    (CompletionRequest, {"max_tokens": "3"}, "max_tokens"),
    (CompletionRequest, {"max_tokens": 3.0}, "max_tokens"),
    (CompletionRequest, {"max_tokens": 0}, "max_tokens"),
    (CompletionRequest, {"logprobs": True}, "logprobs"),
    (CompletionRequest, {"logprobs": 6}, "logprobs"),
    (CompletionRequest, {"stream": "yes"}, "stream"),
    (CompletionRequest, {"stream": 1}, "stream"),
    (CompletionRequest, {"echo": "true"}, "echo"),
    (CompletionRequest, {"temperature": 2.5}, "temperature"),
    (CompletionRequest, {"temperature": -0.1}, "temperature"),
    (CompletionRequest, {"temperature": "0.5"}, "temperature"),
    (CompletionRequest, {"top_p": 0}, "top_p"),
    (CompletionRequest, {"top_p": 1.5}, "top_p"),
    (CompletionRequest, {"n": 0}, "n"),
    (CompletionRequest, {"n": 17}, "n"),
    (CompletionRequest, {"seed": 1 << 63}, "seed"),
    (CompletionRequest, {"seed": 1.5}, "seed"),
    (CompletionRequest, {"stop": 5}, "stop"),
    (CompletionRequest, {"stop": ""}, "stop"),
    (CompletionRequest, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (CompletionRequest, {"stop": ["a", 5]}, "stop.[1]"),
    (CompletionRequest, {"prompt": 5}, "prompt"),
    (CompletionRequest, {"prompt": []}, "prompt"),
    (CompletionRequest, {"prompt": ["a", 5]}, "prompt.[1]"),
    (CompletionRequest, {"prompt": [[1, 2], [-1]]}, "prompt.[1].[0]"),
    (CompletionRequest, {"stream_options": {"include_usage": True}}, "stream_options"),
    (
        CompletionRequest,
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    (CompletionRequest, {"ignore_eos": "yes"}, "ignore_eos"),
    (ChatRequest, {"logprobs": 1}, "logprobs"),
    (ChatRequest, {"top_logprobs": 2}, "top_logprobs"),
    (ChatRequest, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (ChatRequest, {"max_completion_tokens": -1}, "max_completion_tokens"),
    (ChatRequest, {"messages": []}, "messages"),
    (ChatRequest, {"messages": "hi"}, "messages"),
    (ChatRequest, {"messages": [{"role": "robot", "content": "x"}]}, "messages.[0].role"),
    (ChatRequest, {"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
    (ChatRequest, {"messages": [{"content": "x"}]}, "messages.[0].role"),
    (
        ChatRequest,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "messages.[0].content.[0].text",
    ),
    (ChatRequest, {"messages": [{"role": "user", "content": []}]}, "messages.[0].content"),
    (
        ChatRequest,
        {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": []}]},
        "messages.[1].content",
    ),
]


@pytest.mark.parametrize(("model", "fields", "param"), BAD, ids=_id)
def test_a_bad_field_is_named_in_openai_spelling(model, fields, param):
    err = _rejects(model, {**BASE[model], **fields})
    assert err.param == param, err.message
    assert "str" not in err.param.split(".")  # never pydantic's union tags


def test_bad_fields_over_http_are_400_in_the_envelope(runtime):
    for model, fields, param in BAD:
        r = httpx.post(runtime.url + ENDPOINT[model], json={**BASE[model], **fields})
        assert r.status_code == 400, (fields, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param


# The code says which kind of wrong: `invalid_type` only for the wrong JSON
# type; a value of the right type that is out of range is `invalid_value`,
# however large the integer (JSON has no integer limit; 10**30 is not a float).
CODES = [
    (CompletionRequest, {"max_tokens": 10**30}, "max_tokens", "invalid_value"),
    (CompletionRequest, {"max_tokens": 4097}, "max_tokens", "invalid_value"),  # over the limit
    (CompletionRequest, {"max_tokens": -(10**30)}, "max_tokens", "invalid_value"),
    (CompletionRequest, {"max_tokens": "3"}, "max_tokens", "invalid_type"),
    (CompletionRequest, {"max_tokens": 1e30}, "max_tokens", "invalid_type"),  # a float
    (CompletionRequest, {"seed": 2**64}, "seed", "invalid_value"),
    (CompletionRequest, {"seed": -(2**64)}, "seed", "invalid_value"),
    (CompletionRequest, {"seed": 2**63}, "seed", "invalid_value"),
    (CompletionRequest, {"n": 10**30}, "n", "invalid_value"),
    (CompletionRequest, {"logprobs": 2**70}, "logprobs", "invalid_value"),
    (CompletionRequest, {"temperature": 10**30}, "temperature", "invalid_value"),
    (CompletionRequest, {"prompt": [-1]}, "prompt.[0]", "invalid_value"),
    (CompletionRequest, {"prompt": [1, -(10**30)]}, "prompt.[1]", "invalid_value"),
    (CompletionRequest, {"prompt": [259]}, "prompt.[0]", "invalid_value"),  # past the vocabulary
    (CompletionRequest, {"prompt": [1, 10**30]}, "prompt.[1]", "invalid_value"),
    (CompletionRequest, {"prompt": [[1], [2, 300]]}, "prompt.[1].[1]", "invalid_value"),
    (CompletionRequest, {"prompt": [[1], [-2]]}, "prompt.[1].[0]", "invalid_value"),
    (ChatRequest, {"max_completion_tokens": 10**30}, "max_completion_tokens", "invalid_value"),
    (ChatRequest, {"max_completion_tokens": 4097}, "max_completion_tokens", "invalid_value"),
    (ChatRequest, {"logprobs": True, "top_logprobs": 2**64}, "top_logprobs", "invalid_value"),
    (ChatRequest, {"messages": [{"role": "user", "content": []}]}, "messages.[0].content",
     "invalid_value"),
    (ChatRequest, {"messages": [{"role": "user", "content": 5}]}, "messages.[0].content",
     "invalid_type"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "fields", "param", "code"), CODES, ids=_id)
def test_out_of_range_is_invalid_value_and_the_wrong_type_invalid_type(
    runtime, model, fields, param, code
):
    r = httpx.post(runtime.url + ENDPOINT[model], json={**BASE[model], **fields}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error


# Each integer field's range on the served runtime (max_tokens: the default limit).
INT_RANGES = [
    (CompletionRequest, "max_tokens", 1, 4096),
    (CompletionRequest, "n", 1, 16),
    (CompletionRequest, "seed", -(2**63), 2**63 - 1),
    (CompletionRequest, "logprobs", 0, 5),
    (ChatRequest, "max_completion_tokens", 1, 4096),
    (ChatRequest, "top_logprobs", 0, 20),
]


def _outside(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers below `low` or above `high`, near the bounds and far past int64."""
    return (
        st.integers(max_value=low - 1)
        | st.integers(min_value=high + 1)
        | st.integers(min_value=2**63, max_value=10**300)
        | st.integers(min_value=2**63, max_value=10**300).map(lambda i: -i)
    ).filter(lambda i: not low <= i <= high)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), case=st.sampled_from(INT_RANGES))
def test_any_integer_out_of_range_is_invalid_value(runtime, data, case):
    model, name, low, high = case
    value = data.draw(_outside(low, high))
    body = {**BASE[model], name: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    r = httpx.post(runtime.url + ENDPOINT[model], json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (name, "invalid_value")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.lists(st.integers(0, 258), max_size=3), bad=_outside(0, 258), at=st.integers(0, 3))
def test_any_token_id_out_of_range_is_invalid_value_naming_it(runtime, ids, bad, at):
    at = min(at, len(ids))
    prompt = [*ids[:at], bad, *ids[at:]]
    r = httpx.post(runtime.url + "/v1/completions", json={**COMPLETION, "prompt": prompt})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (
        f"prompt.[{at}]",
        "invalid_value",
    )


# --- unknown and unimplemented fields --------------------------------------------


@pytest.mark.parametrize("model", [CompletionRequest, ChatRequest])
def test_an_unknown_field_is_unrecognized(model):
    err = _rejects(model, {**BASE[model], "foo": 1})
    assert err.param == "foo"
    assert err.message == "Unrecognized request argument supplied: foo"
    err = _rejects(model, {**BASE[model], "foo": None})  # null does not make it known
    assert err.param == "foo"


def test_an_unknown_field_in_a_message_is_unrecognized():
    body = {**CHAT, "messages": [{"role": "user", "content": "x", "colour": "red"}]}
    assert _rejects(ChatRequest, body).param == "messages.[0].colour"


NO_OPS = [
    (CompletionRequest, {"presence_penalty": 0, "frequency_penalty": 0.0}),
    (CompletionRequest, {"logit_bias": {}, "best_of": 1, "suffix": "", "user": "u-1"}),
    (ChatRequest, {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}),
    (ChatRequest, {"tools": [], "tool_choice": "none", "parallel_tool_calls": False}),
    (ChatRequest, {"tool_choice": "auto", "functions": [], "function_call": "none"}),
    (ChatRequest, {"response_format": {"type": "text"}, "modalities": ["text"]}),
    (ChatRequest, {"user": "u", "metadata": {"k": "v"}, "store": True, "service_tier": "flex"}),
    (ChatRequest, {"verbosity": "medium", "prompt_cache_key": "k", "safety_identifier": "s"}),
    (
        ChatRequest,
        {
            "messages": [
                {"role": "user", "content": "x", "name": "ann"},
                {"role": "assistant", "content": None, "tool_calls": [], "refusal": None},
            ]
        },
    ),
]


@pytest.mark.parametrize(("model", "fields"), NO_OPS, ids=_id)
def test_unimplemented_fields_pass_at_their_no_op_value(model, fields):
    parse(model, {**BASE[model], **fields})


UNSUPPORTED = [
    (CompletionRequest, {"presence_penalty": 0.5}, "presence_penalty"),
    (CompletionRequest, {"frequency_penalty": -1}, "frequency_penalty"),
    (CompletionRequest, {"logit_bias": {"50256": -100}}, "logit_bias"),
    (CompletionRequest, {"best_of": 3}, "best_of"),
    (CompletionRequest, {"suffix": "end"}, "suffix"),
    (CompletionRequest, {"echo": True, "logprobs": 1}, "echo"),
    (ChatRequest, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (ChatRequest, {"tool_choice": "required"}, "tool_choice"),
    (ChatRequest, {"response_format": {"type": "json_object"}}, "response_format"),
    (ChatRequest, {"modalities": ["text", "audio"]}, "modalities"),
    (ChatRequest, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (ChatRequest, {"reasoning_effort": "low"}, "reasoning_effort"),
    (ChatRequest, {"logit_bias": {"1": 5}}, "logit_bias"),
    (
        ChatRequest,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.[0].content.[0]",
    ),
]


@pytest.mark.parametrize(("model", "fields", "param"), UNSUPPORTED, ids=_id)
def test_unimplemented_fields_are_refused_otherwise(model, fields, param):
    err = _rejects(model, {**BASE[model], **fields})
    assert err.param == param
    assert "is not supported by this runtime" in err.message
    assert err.code == "unsupported_parameter"


# --- bodies, paths and methods ------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"[1, 2]", b'"text"', b"null", b"{", b'{"model": "small", "prompt": "x", "n": NaN}',
     b'{"model": "small", "prompt": "x", "temperature": Infinity}', b"\xff\xfe"],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_that_is_not_a_json_object_is_a_400(runtime, path, raw):
    r = httpx.post(runtime.url + path, content=raw)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_body_over_64_mib_is_a_413(runtime):
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 70000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", runtime.port), timeout=10) as conn:
        conn.sendall(head.encode())
        answer = conn.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413")
    body = json.loads(answer.split("\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "invalid_request_error"


def test_an_unexpected_failure_is_a_500_without_a_traceback(runtime, monkeypatch):
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("secret internals")

    assert runtime.state.engine is not None
    monkeypatch.setattr(runtime.state.engine, "tokenizer", Broken())
    before = runtime.metric("terrace_runtime_requests_total", status="500")
    r = httpx.post(runtime.url + "/v1/completions", json=COMPLETION)
    assert r.status_code == 500
    assert r.json() == {
        "error": {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert runtime.metric("terrace_runtime_requests_total", status="500") == before + 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing", 404),
        ("POST", "/v1/engines/x/completions", 404),
        ("GET", "/v1/completions", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
    ],
)
def test_openai_paths_answer_errors_in_the_openai_envelope(runtime, method, path, status):
    r = httpx.request(method, runtime.url + path)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if status == 405:
        assert r.headers["allow"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v2/nothing", 404), ("GET", "/v2/models/small/infer", 405), ("GET", "/x", 404)],
)
def test_other_paths_answer_errors_in_the_oip_shape(runtime, method, path, status):
    r = httpx.request(method, runtime.url + path)
    assert r.status_code == status
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)


def test_v1_models_by_id(runtime):
    assert httpx.get(runtime.url + f"/v1/models/{MODEL}").json()["id"] == MODEL
    r = httpx.get(runtime.url + "/v1/models/org/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# --- logprobs ---------------------------------------------------------------------


def test_logprobs_0_gives_the_sampled_tokens_own_entry(runtime):
    """vLLM's and OpenAI's shape: each top_logprobs dict holds the sampled token."""
    for stream in (False, True):
        r = httpx.post(
            runtime.url + "/v1/completions",
            json={**COMPLETION, "max_tokens": 6, "logprobs": 0, "seed": 3, "stream": stream},
            timeout=30,
        )
        if stream:
            chunks = [
                json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
            ]
            lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"]]
            tokens = [t for lp in lps for t in lp["tokens"]]
            token_lps = [v for lp in lps for v in lp["token_logprobs"]]
            tops = [t for lp in lps for t in lp["top_logprobs"]]
        else:
            lp = r.json()["choices"][0]["logprobs"]
            tokens, token_lps, tops = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]
        assert len(tokens) == 6
        assert tops == [{t: v} for t, v in zip(tokens, token_lps, strict=True)]


def test_sampled_token_joins_the_top_logprobs(runtime):
    """With sampling the chosen token may be outside the top k: up to k + 1 entries."""
    r = httpx.post(
        runtime.url + "/v1/completions",
        json={**COMPLETION, "max_tokens": 30, "logprobs": 1, "temperature": 2, "seed": 1},
        timeout=30,
    )
    lp = r.json()["choices"][0]["logprobs"]
    for token, value, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert top[token] == value and 1 <= len(top) <= 2


# --- sampling at any temperature -----------------------------------------------------


def _text(r: httpx.Response, chat: bool) -> str:
    """The generated text of a one-choice answer, streamed or not."""
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"] for e in events[:-1]]
        key = (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"])
        return "".join(key(c) for choices in chunks for c in choices)
    choice = r.json()["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [CompletionRequest, ChatRequest], ids=_id)
@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324, 1e-6, 1e-5, 0.7, 2.0])
def test_every_temperature_in_range_is_served(runtime, temperature, model, stream):
    """Tiny temperatures once failed with "Probabilities contain NaN"; below
    1e-5 decoding is greedy, so the answer is temperature 0's."""
    chat = model is ChatRequest
    logprobs = {"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2}
    body = {**BASE[model], "max_tokens": 8, "seed": 5, "stream": stream, **logprobs}

    def text(**fields: Any) -> str:
        r = httpx.post(runtime.url + ENDPOINT[model], json={**body, **fields}, timeout=30)
        return _text(r, chat)

    answer = text(temperature=temperature)
    if temperature < 1e-5:
        assert answer == text(temperature=0)
    # A top_p smaller than any token's probability keeps the most likely one.
    assert text(temperature=temperature, top_p=1e-300) == text(temperature=0)


# --- requests the queue can never hold --------------------------------------------------


def test_more_sequences_than_the_queue_can_hold_is_a_400_naming_the_param(runtime):
    """prompts x n over --max-queue can never be queued: a 400 saying the
    limit (a 429 would invite retries that cannot succeed)."""
    limit = runtime.settings.max_queue
    assert limit == 256  # the default
    queue_full = runtime.metric("terrace_runtime_errors_total", kind="queue_full")
    for fields, param in [
        ({"prompt": ["a"] * (limit + 1)}, "prompt"),
        ({"prompt": [[65, 66]] * (limit + 1)}, "prompt"),
        ({"prompt": ["a"] * (limit + 1), "n": 2}, "prompt"),
        ({"prompt": ["a"] * 17, "n": 16}, "n"),
        ({"prompt": [[65]] * 129, "n": 2}, "n"),
    ]:
        r = httpx.post(
            runtime.url + "/v1/completions",
            json={**COMPLETION, "max_tokens": 1, **fields},
            timeout=30,
        )
        assert r.status_code == 400, (param, r.text)
        assert "retry-after" not in r.headers
        error = r.json()["error"]
        assert (error["param"], error["code"]) == (param, "invalid_value")
        assert str(limit) in error["message"]
    assert runtime.metric("terrace_runtime_errors_total", kind="queue_full") == queue_full
    # The limit itself fits an empty queue.
    r = httpx.post(
        runtime.url + "/v1/completions",
        json={**COMPLETION, "prompt": ["a"] * 16, "n": 16, "max_tokens": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == limit


def test_chat_n_over_the_queue_is_a_400_naming_n(runtime, monkeypatch):
    assert runtime.state.engine is not None
    monkeypatch.setattr(runtime.state.engine, "max_queue", 3)
    body = {**CHAT, "max_tokens": 1}
    r = httpx.post(runtime.url + "/v1/chat/completions", json={**body, "n": 4}, timeout=30)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("n", "invalid_value")
    assert "3" in r.json()["error"]["message"]
    r = httpx.post(runtime.url + "/v1/chat/completions", json={**body, "n": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    r = httpx.post(
        runtime.url + "/v1/completions",
        json={**COMPLETION, "prompt": ["a", "b", "c", "d"], "max_tokens": 1},
        timeout=30,
    )
    assert (r.status_code, r.json()["error"]["param"]) == (400, "prompt")


# --- a stream that breaks ---------------------------------------------------------------


@pytest.mark.parametrize("model", [CompletionRequest, ChatRequest], ids=_id)
def test_a_stream_that_fails_midway_ends_with_the_error_and_no_done(runtime, monkeypatch, model):
    """As the router does: an in-band error event ends a broken stream; a
    [DONE] after it would pretend the answer is whole."""
    engine = runtime.state.engine
    assert engine is not None
    decoder = engine._decoder
    real, steps = decoder.logits, []

    def fails_on_the_fourth_step(batch: Any) -> Any:
        steps.append(len(batch))
        if len(steps) > 3:
            raise RuntimeError("the model fell over")
        return real(batch)

    monkeypatch.setattr(decoder, "logits", fails_on_the_fourth_step)
    logprobs = {"logprobs": True} if model is ChatRequest else {"logprobs": 0}
    body = {**BASE[model], "max_tokens": 50, "ignore_eos": True, "stream": True, **logprobs}
    r = httpx.post(runtime.url + ENDPOINT[model], json=body, timeout=30)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    *chunks, last = [json.loads(e) for e in events]
    assert last == {
        "error": {
            "message": "the model fell over",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert len(chunks) >= 3 and all("choices" in c for c in chunks)  # tokens came first
    # The openai client raises instead of returning a cut-short answer as whole.
    client = openai.OpenAI(base_url=runtime.url + "/v1", api_key="none", max_retries=0)
    steps.clear()
    create = client.chat.completions.create if model is ChatRequest else client.completions.create
    args = {k: v for k, v in body.items() if k != "ignore_eos"}
    with pytest.raises(openai.APIError, match="the model fell over"):
        for _ in create(**args, extra_body={"ignore_eos": True}):
            pass
    monkeypatch.undo()  # the engine serves on
    r = httpx.post(runtime.url + ENDPOINT[model], json={**body, "max_tokens": 3}, timeout=30)
    assert r.text.endswith("data: [DONE]\n\n")


# --- properties ---------------------------------------------------------------------

FIELDS = sorted({n for m in (CompletionRequest, ChatRequest) for n in m.model_fields})
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot"]) | JSON},
        optional={"content": st.text(max_size=8) | JSON, "name": JSON},
    )
    | JSON,
    max_size=3,
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just(MODEL) | JSON,
        "prompt": st.text(max_size=8) | st.lists(st.integers(-2, 300), max_size=4) | JSON,
        "messages": MESSAGES,
    },
).flatmap(
    lambda head: st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON, max_size=5).map(
        lambda tail: {**tail, **head}
    )
)  # fmt: skip


def _names_a_key_path(body: Any, param: str, missing_ok: bool) -> bool:
    """Whether `param` (OpenAI's spelling, `messages.[0].content`) is a path
    of keys and indexes in `body`. Keys may hold dots themselves, so every
    key that fits is tried."""
    if isinstance(body, list) and param.startswith("["):
        index, _, rest = param[1:].partition("]")
        if not index.isdigit() or int(index) >= len(body):
            return False
        rest = rest.removeprefix(".")
        return rest == "" or _names_a_key_path(body[int(index)], rest, missing_ok)
    if not isinstance(body, dict):
        return False
    for key in body:
        if param == key:
            return True
        if param.startswith(key + ".") and _names_a_key_path(
            body[key], param[len(key) + 1 :], missing_ok
        ):
            return True
    return missing_ok and "." not in param


@settings(max_examples=400, deadline=None)
@given(body=BODIES, model=st.sampled_from([CompletionRequest, ChatRequest]))
def test_any_json_object_validates_or_names_a_real_param(body, model):
    try:
        parse(model, body)
    except InvalidRequest as err:
        assert err.param is not None
        assert _names_a_key_path(body, err.param, err.code == "missing_required_parameter"), (
            err.param,
            err.message,
        )
        assert err.message


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=BODIES, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_any_json_object_over_http_is_answered_never_a_500(runtime, body, path):
    for name in ("max_tokens", "max_completion_tokens"):  # keep generation short
        if isinstance(body.get(name), int) and body[name] > 2:
            body = {**body, name: 2}
    r = httpx.post(runtime.url + path, json=body, timeout=30)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
