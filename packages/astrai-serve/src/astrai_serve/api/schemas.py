"""Request bodies of the OpenAI-compatible API (the seed's `ChatMessage` and
`ChatCompletionRequest`, and `CompletionRequest`).

Bounds live in the schema, so a bad value is refused with a 400 naming the field before any
work starts, and `/openapi.json` tells clients (and schemathesis) exactly what is accepted.
Unknown fields are kept aside (`model_extra`) and ignored, except the few that would change the
meaning of the answer: `refused_fields` names those, and the routes refuse them by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_N = 16  # choices per request; more would let one request fill the whole batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_STOP = 16
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # torch.Generator's range, with room for seed + i
MAX_TOOLS = 128  # OpenAI's limit

StopString = Annotated[str, Field(min_length=1)]


class APIModel(BaseModel):
    # NaN and infinities parse from JSON in Python but mean nothing as sampling parameters.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are understood."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(APIModel):
    name: str
    arguments: str = Field(..., description="The arguments as JSON text of an object.")


class MessageToolCall(APIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _text_only(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        for part in self.content if isinstance(self.content, list) else []:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type '{part.type}' are not supported: this "
                                 "model reads text only; send {'type': 'text', 'text': ...} parts")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template expects it (OpenAI's `developer` is a system turn)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [_template_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _template_call(call: MessageToolCall) -> dict[str, Any]:
    """A call as Hugging Face chat templates read it: arguments as an object, not JSON text
    (Qwen's and Llama's templates apply `tojson` to them)."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    function = {"name": call.function.name, "arguments": arguments}
    return {"id": call.id, "type": "function", "function": function, **function}


class FunctionDefinition(APIModel):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of the arguments object (default: no arguments).")
    strict: bool | None = None


class Tool(APIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(APIModel):
    name: str


class NamedToolChoice(APIModel):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(APIModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema",
                                           description="The JSON schema (default: any JSON).")
    strict: bool | None = None


class ResponseFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema: {'name': ..., 'schema': ...}")
        return self


class StreamOptions(APIModel):
    include_usage: bool | None = False


class SamplingFields(APIModel):
    """Fields shared by chat and text completions. None means the default."""

    model: str | None = Field(None, description="Served model name (default: the one served).")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, description="0 is greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables it.")
    min_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(False, description="Keep generating past end-of-sequence.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the output is constrained to match.")

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        ..., description="A string, a list of strings, token ids, or a list of token id lists.")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = Field(False, description="Return the prompt before the completion (with "
                              "its tokens' logprobs when logprobs is set; the first is null).")
    max_tokens: int | None = Field(None, ge=0, description="0 generates nothing: with echo, "
                                   "scores the prompt. Default 16.")

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: Any) -> Any:
        if not value:
            raise ValueError("the prompt is empty; give at least one prompt and one token")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value is False


# Fields OpenAI clients may send that would change the answer if ignored: name -> "harmless?".
CHAT_REFUSED: dict[str, Callable[[Any], bool]] = {
    "functions": _empty, "logit_bias": _empty, "audio": _empty,
    "prediction": _empty, "web_search_options": _empty,
    "function_call": lambda v: v in (None, "none", "auto"),
    "modalities": lambda v: v is None or v == ["text"],
}
COMPLETION_REFUSED: dict[str, Callable[[Any], bool]] = {
    "logit_bias": _empty, "suffix": lambda v: v in (None, ""),
}


def refused_fields(extra: Mapping[str, Any] | None, rules: Mapping[str, Callable[[Any], bool]]
                   ) -> list[str]:
    """Names of unsupported fields present with a value that changes the meaning."""
    return [name for name, harmless in rules.items()
            if extra and name in extra and not harmless(extra[name])]
