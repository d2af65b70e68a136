"""OpenAI-compatible text generation: /v1/completions, /v1/chat/completions
(streaming as server-sent events ending `data: [DONE]`, or, when generation
fails mid-way, with an in-band error event and no `[DONE]`), /v1/models and
/v1/models/{model}.

Request bodies are validated by `openai_requests` (null is the default,
strict types, unknown fields refused). Logprobs are the model's own
distribution (before temperature and top-p), so the router can judge how
sure the cheap tier was. Errors use OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}`. A client that disconnects
cancels its sequences: a stream when StreamingResponse sees it leave, any
other request while it waits for its answer (`http.unless_client_leaves`).
"""

from __future__ import annotations

import asyncio
import codecs
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .batching import BatcherClosed, QueueFull
from .generation import (
    ContextTooLong,
    FinishEvent,
    GenerationEngine,
    SamplingParams,
    Sequence_,
    TokenEvent,
    Tokenizer,
)
from .hf_tokenizer import ChatTemplateError
from .http import (
    BadBody,
    dumps,
    instrumented,
    json_body,
    json_response,
    state_of,
    unless_client_leaves,
)
from .openai_requests import ChatRequest, CompletionRequest, InvalidRequest, Message, parse
from .state import RuntimeState

CHAT_DEFAULT_MAX_TOKENS = 256
R = TypeVar("R", CompletionRequest, ChatRequest)


def render_chat(tok: Tokenizer, messages: list[Message]) -> str:
    """The prompt text: the model's chat template (the byte models: a plain
    transcript). Raises APIError 400 naming `messages`."""
    try:
        return tok.render_chat([{"role": m.role, "content": m.text()} for m in messages])
    except (ChatTemplateError, ValueError) as exc:
        raise APIError(400, str(exc), param="messages") from None


# --- errors -------------------------------------------------------------


def error_envelope(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An OpenAI error answer: HTTP `status`, the envelope's fields, the
    `kind` counted in terrace_runtime_errors_total, and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.kind, self.headers = kind, headers

    def body(self) -> dict[str, Any]:
        return error_envelope(self.message, self.type, self.param, self.code)


def _error_response(state: RuntimeState, err: APIError) -> Response:
    state.metrics.error(err.kind)
    return json_response(err.body(), err.status, err.headers)


# --- generation plumbing ------------------------------------------------


@dataclass
class _Choice:
    """One generated sequence's text decoding and logprob bookkeeping."""

    index: int
    seq: Sequence_
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish: FinishEvent | None = None

    def add(self, event: TokenEvent, tok: Tokenizer) -> str:
        self.offsets.append(len(self.text))
        self.tokens.append(event)
        piece = event.piece if event.piece is not None else tok.token_bytes(event.token_id)
        delta = self.decoder.decode(piece)
        self.text += delta
        return delta

    def close(self, event: FinishEvent) -> str:
        self.finish = event
        delta = self.decoder.decode(b"", final=True)
        self.text += delta
        return delta


def _model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
        kind="not_found",
    )


def _check_model(state: RuntimeState, model: str) -> GenerationEngine:
    if model != state.name:
        raise _model_not_found(model)
    if not state.ready:
        raise APIError(
            503,
            f"model {state.name!r} is not ready: {state.reason}",
            type_="server_error",
            code="model_not_ready",
            kind="not_ready",
        )
    if state.engine is None:
        raise APIError(
            400,
            f"model {state.name!r} is a tensor model; use POST /v2/models/{state.name}/infer",
            param="model",
            code="unsupported_task",
        )
    return state.engine


def _fits_the_queue(engine: GenerationEngine, prompts: int, n: int) -> None:
    """A request's sequences (prompts x n) must fit in the queue when it is
    empty: more can never be queued, so that is a 400 naming the field, not
    a 429 whose retry can never succeed."""
    limit = engine.max_queue
    if prompts > limit:
        raise APIError(
            400,
            f"at most {limit} prompts per request (this runtime queues at most {limit} "
            f"sequences, --max-queue); got {prompts}",
            param="prompt",
            code="invalid_value",
        )
    if prompts * n > limit:
        raise APIError(
            400,
            f"prompts x n must be at most {limit} (this runtime queues at most {limit} "
            f"sequences, --max-queue); got {prompts} x {n} = {prompts * n}",
            param="n",
            code="invalid_value",
        )


def _queue_all(
    engine: GenerationEngine, prompts: list[list[int]], n: int, params: SamplingParams
) -> list[_Choice]:
    choices: list[_Choice] = []
    try:
        for prompt in prompts:
            for _ in range(n):
                # Each choice samples its own stream: n > 1 with a seed gives
                # different choices, and the same set for the same seed.
                seq = engine.submit(prompt, params, stream=len(choices))
                choices.append(_Choice(len(choices), seq))
    except BaseException:
        for c in choices:  # all or nothing: what was queued leaves the queue
            engine.cancel(c.seq)
        raise
    return choices


def _submit(
    engine: GenerationEngine,
    prompts: list[list[int]],
    n: int,
    params: SamplingParams,
    prompt_param: str,
) -> list[_Choice]:
    """Queue every choice, or none; engine errors become the API's."""
    try:
        return _queue_all(engine, prompts, n, params)
    except QueueFull as exc:
        raise APIError(
            429,
            str(exc),
            type_="rate_limit_error",
            code="queue_full",
            kind="queue_full",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except BatcherClosed as exc:
        raise APIError(503, str(exc), type_="server_error", kind="not_ready") from None
    except ContextTooLong as exc:
        raise APIError(400, str(exc), param=prompt_param, code="context_length_exceeded") from None


async def _merged(
    engine: GenerationEngine, choices: list[_Choice]
) -> AsyncIterator[tuple[_Choice, TokenEvent | FinishEvent]]:
    """Events of all choices as they come; cancels the rest if the consumer stops."""
    if len(choices) == 1:  # the common case: no fan-in, one task switch less per token
        (only,) = choices
        try:
            async for event in engine.events(only.seq):
                yield only, event
        finally:
            engine.cancel(only.seq)
        return
    queue: asyncio.Queue[tuple[_Choice, Any]] = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        try:
            async for event in engine.events(choice.seq):
                queue.put_nowait((choice, event))
        except Exception as exc:
            queue.put_nowait((choice, exc))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    remaining = len(choices)
    try:
        while remaining:
            choice, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            if isinstance(event, FinishEvent):
                remaining -= 1
            yield choice, event
    finally:
        for task in tasks:
            task.cancel()
        for c in choices:
            engine.cancel(c.seq)


def _usage(choices: list[_Choice], prompts: int, n: int) -> dict[str, int]:
    # Each prompt counts once, however many completions it has.
    prompt_tokens = sum(c.finish.prompt_tokens for c in choices[::n] if c.finish) if prompts else 0
    completion = sum(c.finish.completion_tokens for c in choices if c.finish)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _sse(data: Any) -> str:
    return f"data: {dumps(data).decode()}\n\n"


# The end of a whole stream. A stream that breaks ends with an error event
# instead: a [DONE] after it would pretend the answer is complete (the
# router ends a broken stream the same way).
DONE = "data: [DONE]\n\n"


def _stream_error(err: Exception) -> str:
    """The in-band error event that ends a stream broken mid-way."""
    message = str(err) or type(err).__name__
    return _sse(
        {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    )


# --- logprob formats ------------------------------------------------------


def _shown(tok: Tokenizer, event: TokenEvent) -> str:
    """The token's text as shown: a stop string may have cut the last one short."""
    if event.piece is None:
        return tok.token_text(event.token_id)
    return event.piece.decode("utf-8", "replace")


def completion_logprobs(
    tok: Tokenizer, events: list[TokenEvent], offsets: list[int]
) -> dict[str, Any]:
    """The legacy shape. Each `top_logprobs` dict holds the `logprobs` most
    likely tokens and, as in OpenAI and vLLM, always the sampled one (so
    `logprobs: 0` gives just the sampled token's entry)."""

    def top(e: TokenEvent) -> dict[str, float]:
        alternatives = {tok.token_text(t): lp for t, lp in e.top}
        alternatives.setdefault(tok.token_text(e.token_id), e.logprob)
        return alternatives

    return {
        "tokens": [_shown(tok, e) for e in events],
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [top(e) for e in events],
        "text_offset": offsets,
    }


def chat_logprobs(tok: Tokenizer, events: list[TokenEvent]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": tok.token_text(token_id),
            "logprob": logprob,
            "bytes": list(tok.token_bytes(token_id)) or None,
        }

    def chosen(e: TokenEvent) -> dict[str, Any]:
        out = entry(e.token_id, e.logprob)
        if e.piece is not None:  # a stop string cut the token short: what was shown
            out.update(token=_shown(tok, e), bytes=list(e.piece) or None)
        return {**out, "top_logprobs": [entry(t, lp) for t, lp in e.top]}

    return {"content": [chosen(e) for e in events], "refusal": None}


# --- handlers -------------------------------------------------------------


async def _parse(request: Request, model_cls: type[R]) -> R:
    try:
        return parse(model_cls, await json_body(request, exact_integers=True))
    except BadBody as exc:
        raise APIError(exc.status, str(exc)) from None
    except InvalidRequest as exc:
        raise APIError(400, exc.message, param=exc.param, code=exc.code) from None


def _prompt_count(prompt: Any) -> int:
    """How many prompts `prompt` holds: a text or one list of token ids is one."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _prompts(req: CompletionRequest, tok: Tokenizer) -> tuple[list[str | None], list[list[int]]]:
    """Each prompt's text (None for token ids) and token ids."""
    p = req.prompt
    if isinstance(p, str):
        return [p], [tok.encode(p)]
    if isinstance(p[0], str):
        texts = cast(list[str], p)
        return list(texts), [tok.encode(t) for t in texts]
    if isinstance(p[0], int):
        return [None], [_ids(cast(list[int], p), tok, "prompt")]
    nested = cast(list[list[int]], p)
    return [None] * len(nested), [_ids(x, tok, f"prompt.[{i}]") for i, x in enumerate(nested)]


def _ids(ids: list[int], tok: Tokenizer, param: str) -> list[int]:
    """Token-id prompts get the beginning-of-sequence token the model expects.
    An id outside the vocabulary is a 400 naming it (`prompt.[2]`)."""
    for at, i in enumerate(ids):
        if not 0 <= i < tok.vocab_size:
            raise APIError(
                400,
                f"Invalid value for '{param}.[{at}]': token ids must be in [0, {tok.vocab_size}).",
                param=f"{param}.[{at}]",
                code="invalid_value",
            )
    bos = tok.encode("")
    return ids if not bos or ids[:1] == bos[:1] else [*bos[:1], *ids]


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _max_tokens(state: RuntimeState, value: int | None, param: str, default: int) -> int:
    """`value`, or the endpoint's default when absent or null; at most the limit."""
    limit = state.settings.max_tokens_limit
    value = value if value is not None else min(default, limit)
    if value > limit:
        raise APIError(400, f"{param} must be at most {limit}", param=param, code="invalid_value")
    return value


async def completions(request: Request) -> Response:
    state = state_of(request)
    try:
        req: CompletionRequest = await _parse(request, CompletionRequest)
        engine = _check_model(state, req.model)
        _fits_the_queue(engine, _prompt_count(req.prompt), req.n)
        tok = engine.tokenizer
        texts, prompts = _prompts(req, tok)
        params = SamplingParams(
            max_tokens=_max_tokens(
                state, req.max_tokens, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS
            ),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_bytes(),
            logprobs=req.logprobs,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        choices = _submit(engine, prompts, req.n, params, "prompt")
    except APIError as err:
        return _error_response(state, err)

    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def prompt_text(i: int) -> str:
        text = texts[i]
        if text is None:  # a token-id prompt: echo what the ids spell
            text = b"".join(tok.token_bytes(t) for t in prompts[i]).decode("utf-8", "replace")
        return text

    echo = [prompt_text(c.index // req.n) if req.echo else "" for c in choices]

    def chunk_choice(
        c: _Choice, text: str, events: list[TokenEvent], offsets: list[int], finish: str | None
    ) -> dict[str, Any]:
        lp = completion_logprobs(tok, events, offsets) if req.logprobs is not None else None
        return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}

    if req.stream:

        async def stream() -> AsyncIterator[str]:
            base = {"id": rid, "object": "text_completion", "created": created, "model": state.name}
            try:
                for c in choices:
                    if echo[c.index]:
                        yield _sse(
                            {**base, "choices": [chunk_choice(c, echo[c.index], [], [], None)]}
                        )
                async for c, event in _merged(engine, choices):
                    if isinstance(event, TokenEvent):
                        delta = c.add(event, tok)
                        if delta or req.logprobs is not None:
                            yield _sse(
                                {
                                    **base,
                                    "choices": [
                                        chunk_choice(c, delta, [event], c.offsets[-1:], None)
                                    ],
                                }
                            )
                    else:
                        delta = c.close(event)
                        yield _sse(
                            {**base, "choices": [chunk_choice(c, delta, [], [], event.reason)]}
                        )
                if req.include_usage:
                    yield _sse(
                        {**base, "choices": [], "usage": _usage(choices, len(prompts), req.n)}
                    )
                yield DONE
            except Exception as exc:  # mid-stream failure: say so in-band, and no [DONE]
                state.metrics.error("inference")
                yield _stream_error(exc)

        return _sse_response(stream())

    failed = await unless_client_leaves(request, _collect(engine, choices, state))
    if failed is not None:
        return failed
    return json_response(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": state.name,
            "choices": [
                chunk_choice(
                    c,
                    echo[c.index] + c.text,
                    c.tokens,
                    c.offsets,
                    c.finish.reason if c.finish else None,
                )
                for c in choices
            ],
            "usage": _usage(choices, len(prompts), req.n),
            "system_fingerprint": None,
        }
    )


async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    try:
        req: ChatRequest = await _parse(request, ChatRequest)
        engine = _check_model(state, req.model)
        _fits_the_queue(engine, 1, req.n)
        tok = engine.tokenizer
        prompt = tok.encode(render_chat(tok, req.messages))
        top = req.top_logprobs if req.top_logprobs is not None else 0
        max_tokens = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        params = SamplingParams(
            max_tokens=_max_tokens(state, max_tokens, param, CHAT_DEFAULT_MAX_TOKENS),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_bytes(),
            logprobs=top if req.logprobs else None,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        choices = _submit(engine, [prompt], req.n, params, "messages")
    except APIError as err:
        return _error_response(state, err)

    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if req.stream:

        async def stream() -> AsyncIterator[str]:
            base = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.name,
                "system_fingerprint": None,
            }
            try:
                for c in choices:
                    yield _sse(
                        {
                            **base,
                            "choices": [
                                {
                                    "index": c.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                async for c, event in _merged(engine, choices):
                    if isinstance(event, TokenEvent):
                        delta = c.add(event, tok)
                        if delta or req.logprobs:
                            yield _sse(
                                {
                                    **base,
                                    "choices": [
                                        {
                                            "index": c.index,
                                            "delta": {"content": delta},
                                            "logprobs": chat_logprobs(tok, [event])
                                            if req.logprobs
                                            else None,
                                            "finish_reason": None,
                                        }
                                    ],
                                }
                            )
                    else:
                        delta = c.close(event)
                        yield _sse(
                            {
                                **base,
                                "choices": [
                                    {
                                        "index": c.index,
                                        "delta": {"content": delta} if delta else {},
                                        "logprobs": None,
                                        "finish_reason": event.reason,
                                    }
                                ],
                            }
                        )
                if req.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(choices, 1, req.n)})
                yield DONE
            except Exception as exc:  # mid-stream failure: say so in-band, and no [DONE]
                state.metrics.error("inference")
                yield _stream_error(exc)

        return _sse_response(stream())

    failed = await unless_client_leaves(request, _collect(engine, choices, state))
    if failed is not None:
        return failed
    return json_response(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": state.name,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": chat_logprobs(tok, c.tokens) if req.logprobs else None,
                    "finish_reason": c.finish.reason if c.finish else None,
                }
                for c in choices
            ],
            "usage": _usage(choices, 1, req.n),
            "system_fingerprint": None,
        }
    )


def _model_object(state: RuntimeState) -> dict[str, Any]:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "terrace"}


async def list_models(request: Request) -> Response:
    return json_response({"object": "list", "data": [_model_object(state_of(request))]})


async def retrieve_model(request: Request) -> Response:
    state = state_of(request)
    model = request.path_params["model"]
    if model != state.name:
        return _error_response(state, _model_not_found(model))
    return json_response(_model_object(state))


def routes() -> list[Route]:
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/completions", instrumented("completions", completions), methods=["POST"]),
        Route(
            "/v1/chat/completions",
            instrumented("chat_completions", chat_completions),
            methods=["POST"],
        ),
    ]


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _collect(
    engine: GenerationEngine, choices: list[_Choice], state: RuntimeState
) -> Response | None:
    """Run every choice to its end; an error response if generation failed, else None.
    Cancelling it cancels the choices' sequences."""
    try:
        async for c, event in _merged(engine, choices):
            if isinstance(event, TokenEvent):
                c.add(event, engine.tokenizer)
            else:
                c.close(event)
    except BatcherClosed as exc:
        return _error_response(
            state, APIError(503, str(exc), type_="server_error", kind="not_ready")
        )
    except Exception as exc:
        return _error_response(
            state,
            APIError(500, f"generation failed: {exc}", type_="server_error", kind="inference"),
        )
    return None
