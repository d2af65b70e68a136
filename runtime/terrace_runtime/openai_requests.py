"""OpenAI request bodies: the pydantic models of /v1/completions and
/v1/chat/completions, and their validation into OpenAI-style 400s.

Rules, for every field:

- An explicit `null` in an optional field means its default (OpenAI's SDKs
  send nulls); a required field (`model`, `prompt`, `messages`) must not be null.
- Types are strict: `"3"` is not an integer, `1` is not a boolean.
- A name that is not an OpenAI field (nor an extension implemented here,
  `ignore_eos`) is refused: "Unrecognized request argument supplied: foo".
- OpenAI fields this runtime does not implement (penalties, tools, ...) are
  accepted only at their no-op value; any other value is refused as
  "not supported by this runtime".

`parse(model_cls, body)` returns the model or raises `InvalidRequest` with
OpenAI's spelling of the offending field (`stop`, `messages.[0].content`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import GroupedMetadata
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

INT64 = 1 << 63


def _nullable_optionals(schema: dict[str, Any]) -> None:
    """JSON schema: every optional property also takes null (the null rule)."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or {"type": "null"} in prop.get("anyOf", ()):
            continue
        meta = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **meta}


class _Body(BaseModel):
    """Strict, closed, and null means default (see the module docstring)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra=lambda schema, _: _nullable_optionals(schema),
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or fields[k].is_required()
        }


class only(GroupedMetadata):  # noqa: N801 - reads as a constraint, like Field
    """A field this runtime does not implement: its no-op values pass, any
    other (well-typed) value fails as `unsupported` with `hint`, e.g.
    `Annotated[float, only(0.0, hint="only 0")]`. The JSON schema lists
    exactly the no-op values."""

    def __init__(self, *noops: Any, hint: str) -> None:
        self.noops, self.hint = noops, hint

    def __iter__(self) -> Iterator[Any]:
        def check(value: Any) -> Any:
            if any(value == ok and type(value) is type(ok) for ok in self.noops):
                return value
            raise PydanticCustomError("unsupported", self.hint)

        yield AfterValidator(check)
        yield WithJsonSchema({"enum": list(self.noops)} if self.noops else {"not": {}})


Penalty = Annotated[float, Field(ge=-2.0, le=2.0), only(0.0, hint="only 0")]
LogitBias = Annotated[dict[str, Annotated[int, Field(ge=-100, le=100)]], only({}, hint="only {}")]
NotImplemented_ = Annotated[
    dict[str, Any], only(hint="this runtime does not implement it; send null")
]
StopString = Annotated[str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4)]


class StreamOptions(_Body):
    """`stream_options`: a last chunk with the usage, when asked."""

    include_usage: bool = False
    include_obfuscation: bool = True  # accepted; streams carry no obfuscation padding


class _Request(_Body):
    model: str = Field(description="Must be this runtime's model name.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = Field(
        default=None, description="Only with stream: true."
    )
    stop: Stop | None = Field(default=None, description="Up to 4 non-empty strings.")
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    ignore_eos: bool = Field(
        default=False, description="vLLM's extension: generate exactly max_tokens."
    )
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias = Field(default_factory=dict)
    user: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> Any:
        if v is not None and not info.data.get("stream"):
            raise PydanticCustomError(
                "invalid_value", "stream_options is only allowed when stream is true"
            )
        return v

    def stop_bytes(self) -> tuple[bytes, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s.encode("utf-8") for s in stops)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: Prompt = Field(description="Text, texts, token ids, or lists of token ids.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Default 16, at most the runtime's limit."
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=5,
        description="Log-probabilities of the sampled token and this many alternatives.",
    )
    echo: bool = False
    best_of: Annotated[int, Field(ge=0, le=20), only(1, hint="only 1")] = 1
    suffix: Annotated[str, only("", hint="only an empty suffix")] = ""

    @field_validator("echo")
    @classmethod
    def _echo_without_logprobs(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("logprobs") is not None:
            raise PydanticCustomError("unsupported", "echo with logprobs")
        return v


class ContentPart(_Body):
    """A text part of a chat message's content (the only kind served)."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in ("text", None):
            raise PydanticCustomError(
                "unsupported", "content parts of type {kind}; text only", {"kind": data["type"]}
            )
        return data


class Message(_Body):
    """One chat message; tool calls and audio are not served."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = Field(
        default=None, description="A string, null, or at least one text part."
    )
    name: str | None = None
    refusal: str | None = None
    tool_call_id: str | None = None
    tool_calls: Annotated[list[Any], only([], hint="only [] or null")] = Field(default_factory=list)
    function_call: NotImplemented_ | None = None
    audio: NotImplemented_ | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="Default 256, at most the runtime's limit."
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Wins over max_tokens."
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Needs logprobs.")
    tools: Annotated[list[Any], only([], hint="only [] or null")] = Field(default_factory=list)
    tool_choice: Annotated[
        str | dict[str, Any], only("none", "auto", hint="without tools, only none or auto")
    ] = "auto"
    parallel_tool_calls: bool = True  # no tools, so no effect
    functions: Annotated[list[Any], only([], hint="only [] or null")] = Field(default_factory=list)
    function_call: Annotated[
        str | dict[str, Any], only("none", "auto", hint="only none or auto")
    ] = "auto"
    response_format: Annotated[
        dict[str, Any], only({"type": "text"}, hint="only {'type': 'text'}")
    ] = Field(default_factory=lambda: {"type": "text"})
    modalities: Annotated[list[str], only(["text"], hint="only ['text']")] = Field(
        default_factory=lambda: ["text"]
    )
    verbosity: Annotated[Literal["low", "medium", "high"], only("medium", hint="only medium")] = (
        "medium"
    )
    reasoning_effort: Annotated[str, only(hint="not a reasoning model")] | None = None
    audio: NotImplemented_ | None = None
    prediction: NotImplemented_ | None = None
    web_search_options: NotImplemented_ | None = None
    # Bookkeeping and routing hints: accepted, no effect here.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs: true")
        return v


# --- errors ---------------------------------------------------------------

M = TypeVar("M", bound=_Body)


class InvalidRequest(ValueError):
    """A 400: `message` for people, `param` the field path, `code` OpenAI's kind."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def param_path(body: Any, loc: tuple[int | str, ...], missing: bool = False) -> list[str]:
    """OpenAI's spelling of pydantic's `loc` as parts (`messages`, `[0]`, `content`).

    Pydantic puts the tried member of a union (`str`, `list[str]`) into the
    loc; walking the body alongside keeps only its real keys and indexes. A
    missing field's name (the last item) is kept too."""
    parts: list[str] = []
    node = body
    for i, item in enumerate(loc):
        if isinstance(item, str) and isinstance(node, dict) and item in node:
            parts.append(item)
            node = node[item]
        elif isinstance(item, int) and isinstance(node, list) and 0 <= item < len(node):
            parts.append(f"[{item}]")
            node = node[item]
        elif missing and i == len(loc) - 1 and isinstance(item, str):
            parts.append(item)
    return parts


def _is_type_error(kind: str) -> bool:
    return kind.endswith("_type")


def _describe(body: Any, exc: ValidationError) -> InvalidRequest:
    """The most specific of pydantic's errors as OpenAI would word it: the
    deepest path (inside a union, the member that got furthest), and at the
    same depth a value error before a type error (the member whose type the
    value has: `[-1]` is a list of ints out of range, not a bad string)."""
    errors = exc.errors(include_url=False)
    paths = [param_path(body, e["loc"], e["type"] == "missing") for e in errors]
    best = max(
        range(len(errors)),
        key=lambda i: (len(paths[i]), not _is_type_error(errors[i]["type"]), -i),
    )
    err, param = errors[best], (".".join(paths[best]) if paths[best] else None)
    kind = err["type"]
    if kind == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
        )
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param)
    if kind == "unsupported":
        return InvalidRequest(
            f"'{param}' is not supported by this runtime ({err['msg']}).",
            param,
            "unsupported_parameter",
        )
    code = "invalid_type" if _is_type_error(kind) else "invalid_value"
    return InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param, code)


def parse(model_cls: type[M], body: Any) -> M:
    """`body` (parsed JSON) as `model_cls`, or InvalidRequest naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        raise _describe(body, exc) from None
