"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions`` (pydantic, strict types).

Every number a request can carry is bounded here to what the engine accepts, so a request that
passes validation cannot make generation fail on a parameter. OpenAI features this server cannot
honour (penalties, logit_bias, logprobs, tools, structured output, n > 1, ...) are refused with a
400 ``unsupported_parameter`` (``unsupported``), never silently ignored; unknown fields outside that
list are accepted and ignored. Extensions: ``method`` (``eagle2``, ``eagle1``, ``chain``,
``vanilla``) and ``top_k``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..config import MAX_STOP_CHARS, METHODS, MIN_TEMPERATURE, SEED_MAX, SEED_MIN

INT32_MAX = 2**31 - 1


def _temperature(t: float) -> float:
    if 0 < t < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return t


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown OpenAI fields are accepted, ignored


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


Tokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(_temperature)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Union[StopString, Annotated[list[StopString], Field(max_length=4)], None]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class Common(_Strict):
    model: str | None = None
    max_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None  # extension
    n: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None  # only 1: one choice per request (``unsupported``)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    presence_penalty: float | None = None  # only the no-op value 0 (``unsupported``)
    frequency_penalty: float | None = None
    user: str | None = None
    method: Literal[METHODS] = "eagle2"  # extension: eagle2 | eagle1 | chain | vanilla  # type: ignore[valid-type]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Tokens | None = None
    logprobs: bool | None = None  # only false (``unsupported``)


class CompletionRequest(Common):
    prompt: Union[str, Annotated[list[TokenId], Field(min_length=1)], Annotated[list[str], Field(min_length=1, max_length=1)],
                  Annotated[list[list[TokenId]], Field(min_length=1, max_length=1)]]
    echo: bool | None = None  # only false (``unsupported``)
    logprobs: int | None = None  # only none
    suffix: str | None = None  # only empty
    best_of: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None  # only 1 (``unsupported``)


def _no_op(name: str, v) -> bool:
    """Whether an OpenAI field's value asks for nothing this server would have to do."""
    if name == "logprobs":
        return v is None or v is False
    if name in ("n", "best_of"):
        return v is None or v == 1
    if v is None or v is False or v == 0 or v == "" or v == [] or v == {}:
        return True
    if name == "response_format":
        return isinstance(v, dict) and v.get("type") == "text"
    if name in ("tool_choice", "function_call"):
        return v in ("none", "auto")
    if name == "modalities":
        return v == ["text"]
    return False


# fields of OpenAI's API that would change the answer (or its shape) in ways this server does not
# implement: a request asking for one is refused, so a client never gets an answer it did not ask for
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "echo", "suffix",
               "response_format", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
               "modalities", "audio", "prediction", "n", "best_of")


def unsupported(req: BaseModel) -> str | None:
    """The first field of ``req`` that asks for an unsupported feature, else None."""
    extra = req.model_extra or {}
    for name in UNSUPPORTED:
        v = getattr(req, name, None) if name in type(req).model_fields else extra.get(name)
        if name == "parallel_tool_calls" and not extra.get("tools"):
            continue  # meaningless without tools
        if name == "best_of" and name not in type(req).model_fields:
            continue  # a completions field: in a chat request, an unknown field like any other
        if not _no_op(name, v):
            return name
    return None
