"""The request bodies the gateway accepts, declared once as pydantic models.

Every model refuses unknown fields (OpenAI answers 400 to an unrecognized argument);
fields OpenAI defines that change nothing here (``user``, ``metadata``, ``store``,
``service_tier``, ``parallel_tool_calls``) are accepted and ignored. Bounds follow
OpenAI's where it has them; llama.cpp's extras (``top_k``, ``min_p``,
``repeat_penalty``, ``grammar``, ``ignore_eos``) and ours (``session``) are accepted too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from llamafleet.runtime import protocol

#: the most stop strings a request may give
MAX_STOP = protocol.MAX_STOP_STRINGS
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Number = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    """A JSON object with a fixed set of keys (an unknown key is a 400)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FunctionDef(Strict):
    name: FunctionName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: FunctionName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class TextPart(Strict):
    type: Literal["text"]
    text: StrictStr


class CalledFunction(Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCall(Strict):
    id: StrictStr
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    refusal: StrictStr | None = None

    def text(self) -> str | None:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class JsonSchemaFormat(Strict):
    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] | StrictBool | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    #: llama-server's shorthand: ``{"type": "json_object", "schema": {...}}``
    schema_: dict[str, Any] | StrictBool | None = Field(default=None, alias="schema")


class StreamOptions(Strict):
    include_usage: StrictBool | None = None


class Sampled(Strict):
    """The fields every generating endpoint takes."""

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=0, le=protocol.MAX_GENERATE_TOKENS)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    n: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    # llama.cpp's extras
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[Number, Field(gt=0, le=100)] | None = None
    grammar: StrictStr | None = None
    ignore_eos: StrictBool = False
    # ours
    session: StrictStr | None = None
    #: seconds the model stays loaded once idle (-1: never), as in Ollama
    keep_alive: Any = None
    #: speculative decoding: "model" (its configuration; the default), "lookup",
    #: "draft" or "off"
    speculative: Literal["model", "lookup", "draft", "off"] | None = None


class ChatCompletionRequest(Sampled):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=protocol.MAX_MESSAGES)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=0, le=protocol.MAX_GENERATE_TOKENS)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=protocol.MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=protocol.MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    #: llama.cpp's extra: a JSON schema for the output
    json_schema: dict[str, Any] | None = None


Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(Sampled):
    prompt: Prompt
    #: legacy completions: the number of alternatives per token (0..5)
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = None


class EmbeddingRequest(Strict):
    model: StrictStr
    input: StrictStr | Annotated[list[StrictStr], Field(max_length=protocol.MAX_EMBED_TEXTS)] | \
        list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


class TokenizeRequest(Strict):
    """llama-server's ``POST /tokenize``."""

    content: StrictStr
    model: StrictStr | None = None
    add_special: StrictBool = False
    parse_special: StrictBool = True
    with_pieces: StrictBool = False


class DetokenizeRequest(Strict):
    """llama-server's ``POST /detokenize``."""

    tokens: Annotated[list[StrictInt], Field(max_length=protocol.MAX_TOKENS_IN)]
    model: StrictStr | None = None
