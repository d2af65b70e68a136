"""Properties of the router's pure parts, with hypothesis: SSE framing under
any chunking and any line terminators, and the request validators under any
JSON (a 400 naming a real field, or a pass: never anything else)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from terrace_router import sse
from terrace_router.errors import RouterError
from terrace_router.proxy import parse_json, without_nulls
from terrace_router.schemas import validate

TERMINATORS = st.sampled_from([b"\n", b"\r\n", b"\r"])
# Data without line breaks (SSE data lines cannot hold them).
TEXT = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30
)


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """(the data of each event, the wire bytes), with mixed terminators,
    comment lines and multi-line data."""
    datas: list[bytes] = []
    wire = b""
    last = b""

    def terminator() -> bytes:
        # CR then LF is one CRLF, never two line ends: no LF right after a lone CR.
        nonlocal last
        last = draw(TERMINATORS.filter(lambda t: not (last == b"\r" and t == b"\n")))
        return last

    for _ in range(draw(st.integers(0, 6))):
        lines = draw(st.lists(TEXT, min_size=1, max_size=3))
        for line in lines:
            if draw(st.booleans()):
                wire += b": keep-alive" + terminator()
            wire += b"data: " + line.encode() + terminator()
        wire += terminator()  # the empty line that ends the event
        datas.append(b"\n".join(line.encode() for line in lines))
    return datas, wire


def _relay(wire: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    """Feed `wire` in chunks cut at `cuts` as the relay does: (blocks sent, left pending)."""
    pending = b""
    sent: list[bytes] = []
    bounds = sorted({c for c in cuts if 0 < c < len(wire)}) + [len(wire)]
    start = 0
    for end in bounds:
        pending += wire[start:end]
        start = end
        n = sse.complete_prefix(pending)
        if n:
            sent.append(pending[:n])
            pending = pending[n:]
    return sent, pending


@given(event_streams(), st.lists(st.integers(0, 400), max_size=8))
@settings(max_examples=300)
def test_any_chunking_relays_exactly_the_events(stream, cuts):
    datas, wire = stream
    sent, pending = _relay(wire, cuts)
    assert b"".join(sent) + pending == wire  # nothing lost, nothing added
    assert sse.data_fields(b"".join(sent)) == datas  # every event, whole, in order
    assert sse.data_fields(pending) == []  # what is held back is no event yet


@given(event_streams(), st.integers(0, 10_000), st.lists(st.integers(0, 400), max_size=8))
@settings(max_examples=300)
def test_a_stream_cut_anywhere_relays_only_whole_events(stream, cut_at, cuts):
    datas, wire = stream
    cut = cut_at % (len(wire) + 1)
    sent, _ = _relay(wire[:cut], cuts)
    relayed = sse.data_fields(b"".join(sent))
    # A prefix of the events, each whole: never half an event's data.
    assert relayed == datas[: len(relayed)]
    # And the error event the relay then adds parses on its own.
    (error,) = sse.data_fields(sse.error_event("broke"))
    assert json.loads(error)["error"]["message"] == "broke"


def test_inspection_finds_errors_done_and_junk():
    ok = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
    assert sse.inspect(ok) == sse.Inspection(len(ok), True, False, True)
    assert sse.inspect(b'data: {"error": {"message": "x"}}\n\n').carries_error
    good = b'data: {"a": 1}\n\n'
    assert sse.inspect(good + b"data: {not json\n\n") == sse.Inspection(
        len(good), False, False, False
    )
    assert not sse.inspect(b"data: [1, 2]\n\n").well_formed
    assert sse.inspect(b": ping\n\n") == sse.Inspection(8, True, False, False)
    # Nothing after [DONE] belongs to the stream.
    assert sse.inspect(ok + good).usable == len(ok)
    assert sse.split_events(b"data: a\r\n\r\ndata: b\n\n") == [b"data: a\r\n\r\n", b"data: b\n\n"]


# -- request validators -------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELDS = [
    "model",
    "messages",
    "prompt",
    "stream",
    "temperature",
    "top_p",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "stream_options",
    "user",
    "anything",
]
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "robot"]) | JSON},
    optional={"content": st.text(max_size=8) | JSON},
)
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | st.fixed_dictionaries(
    {"model": st.text(max_size=4) | JSON},
    optional={
        "messages": st.lists(MESSAGE, max_size=2) | JSON,
        "prompt": st.text(max_size=8) | JSON,
        "max_tokens": st.integers(-2, 3) | JSON,
        "stop": st.lists(st.text(max_size=3), max_size=5) | JSON,
        "stream": JSON,
    },
)


# The codes of the validators' 400s. Only a body that is not a JSON object
# (code None) names no field; every other 400 names one.
PARAM_MAY_BE_NONE: set[str | None] = {None}
CODES = PARAM_MAY_BE_NONE | {"missing_required_parameter", "invalid_value"}
_MISSING = object()


def _walk(payload: Any, parts: list[str]) -> Any:
    """The value at `parts` (OpenAI's spelling split on ".": `messages`, `[0]`,
    `role`) in `payload`, or `_MISSING` where the path leaves it."""
    node = payload
    for part in parts:
        if part.startswith("[") and part.endswith("]") and isinstance(node, list):
            i = int(part[1:-1])
            if not 0 <= i < len(node):
                return _MISSING
            node = node[i]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


@pytest.mark.parametrize("kind", ["chat", "completions"])
@given(body=BODIES)
@settings(max_examples=400)
def test_any_json_body_is_valid_or_a_400_naming_a_real_field(kind, body):
    payload = without_nulls(parse_json(json.dumps(body).encode()))
    try:
        validate(kind, payload)
    except RouterError as err:
        assert err.status == 400 and err.type == "invalid_request_error"
        assert err.code in CODES, err.code
        assert "Traceback" not in err.message
        if err.code in PARAM_MAY_BE_NONE:
            assert err.param is None, err.param
            return
        assert err.param, (err.code, err.param)
        parts = err.param.split(".")
        if err.code == "missing_required_parameter":
            # The field is absent where the payload it belongs to is present.
            assert _walk(payload, parts[:-1]) is not _MISSING, err.param
            assert _walk(payload, parts) is _MISSING, err.param
        else:  # a value that is there and wrong
            assert _walk(payload, parts) is not _MISSING, err.param
    else:
        assert isinstance(payload.get("model"), str) and payload["model"]


@given(st.sampled_from(["NaN", "Infinity", "-Infinity"]), st.sampled_from(FIELDS))
def test_non_json_numbers_are_refused_anywhere(literal, field):
    with pytest.raises(RouterError) as exc:
        parse_json(f'{{"model": "auto", "{field}": [{literal}]}}'.encode())
    assert exc.value.status == 400
