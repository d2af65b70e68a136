"""Validation of OpenAI request bodies, and the text the classifier scores.

The router forwards the client's JSON as it came (unknown fields included:
upstreams such as vLLM accept many extensions), so these models only check
the fields the router itself relies on or that a client commonly gets wrong,
and turn pydantic's error into a 400 naming the bad `param` the way OpenAI
does (`messages.[0].role`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RouterError, bad_request


class _Open(BaseModel):
    # extra="allow": fields the router does not know are still valid upstream.
    # strict: OpenAI rejects "5" for an integer and "yes" for a boolean too.
    model_config = ConfigDict(extra="allow", strict=True)


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


# OpenAI's bounds: at most 4 stop sequences; a seed is a 64-bit integer.
_Stops = str | Annotated[list[str], Field(max_length=4)]
_INT64 = 2**63


class StreamOptions(_Open):
    include_usage: bool | None = None


class _Sampling(_Open):
    model: str = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    stop: _Stops | None = None
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)
    user: str | None = None
    stream_options: StreamOptions | None = None
    # OpenAI's processing tiers; `flex` is cheap and sheddable (policy.decide_flex).
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=20)
    suffix: str | None = None


_MODELS: dict[str, type[_Sampling]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
}


def validate(kind: str, payload: Any) -> None:
    """Raise a 400 RouterError naming the first bad field of an OpenAI request body."""
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        _MODELS[kind].model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = param_name(payload, err["loc"], missing=err["type"] == "missing")
        if err["type"] == "missing":
            raise bad_request(
                f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
            ) from None
        raise bad_request(
            f"Invalid value for '{param}': {err['msg']}.", param, "invalid_value"
        ) from None
    if kind == "chat" and payload.get("top_logprobs") is not None and not payload.get("logprobs"):
        raise bad_request(
            "Invalid value for 'top_logprobs': only allowed when 'logprobs' is true.",
            "top_logprobs",
            "invalid_value",
        )
    if payload.get("stream_options") is not None and payload.get("stream") is not True:
        raise bad_request(
            "Invalid value for 'stream_options': only allowed when 'stream' is true.",
            "stream_options",
            "invalid_value",
        )


def param_name(payload: Any, loc: tuple[Any, ...], *, missing: bool = False) -> str:
    """OpenAI's spelling of a field path (`messages.[0].content`), from pydantic's loc.

    Pydantic adds the tried member of a union (`str`, `list[...]`) to the
    loc; walking the payload alongside keeps only real keys and indexes. A
    key the payload lacks is named only when the error is that it is
    `missing` (a dict-valued `prompt` fails as `prompt.str`: that names
    `prompt`, not a key `str` inside it).
    """
    parts: list[str] = []
    node = payload
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and 0 <= item < len(node):
            parts.append(f"[{item}]")
            node = node[item]
        elif isinstance(item, str) and isinstance(node, dict):
            if item not in node:
                if missing:
                    parts.append(item)  # a missing field: name it and stop
                break
            parts.append(item)
            node = node[item]
        else:
            break  # a union tag or a leaf: the path so far is the param
    return ".".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prompt_text(kind: str, payload: dict[str, Any]) -> str:
    """The text the complexity classifier scores: the last user turn (RouteLLM does the same).

    Whole, not clipped: the classifier owns clipping (classifier.features), so
    the router and `terrace-classifier score` read a long prompt the same way."""
    if kind == "chat":
        messages = payload["messages"]
        for message in reversed(messages):
            if message.get("role") == "user":
                return _content_text(message.get("content"))
        return _content_text(messages[-1].get("content"))
    prompt = payload["prompt"]
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    return prompt


def is_deterministic(payload: dict[str, Any]) -> bool:
    """True when the client asked for greedy decoding (temperature 0).

    A request without `temperature` gets the upstream's default (1.0 in
    OpenAI's API and vLLM), so it is not deterministic.
    """
    t = payload.get("temperature")
    return t is not None and t == 0


__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "RouterError",
    "is_deterministic",
    "param_name",
    "prompt_text",
    "validate",
]
