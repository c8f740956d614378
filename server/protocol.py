"""The OpenAI request bodies the server accepts (pydantic), the bounds it puts on them, and how they become
SamplingParams. A field the server does not honour is refused by name, never dropped."""
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmserve.errors import ParamError
from llmserve.sampling_params import SamplingParams
from llmserve.structured_outputs import StructuredOutputsParams


@dataclass
class RequestLimits:
    """What one request may ask of the engine (flags of `llm serve`)."""

    max_n: int = 128
    max_prompts: int = 256  # prompts in one /v1/completions request
    max_stop_strings: int = 32
    max_stop_string_chars: int = 1024
    max_logprobs: int = 20  # logprobs / top_logprobs (the engine's max_logprobs)
    # n x max_tokens summed over the prompts (no max_tokens: the rest of the context); high enough that n=16 without
    # max_tokens on a 128k-context model passes, low enough that n=128 of them does not
    max_request_tokens: int = 1 << 22
    allow_unknown_fields: bool = False  # vLLM's behaviour: log and drop fields the server does not know


class Strict(BaseModel):
    """Nested objects: an unknown field is an error; numbers must be finite (JSON's 1e309 is infinity)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Body(BaseModel):
    """A request body: unknown fields are kept aside so the server can name them in its refusal (or, with
    allow_unknown_fields, log them)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    def unknown_fields(self) -> list[str]:
        return list(self.model_extra or {})


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced in full, as strict=True asks


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        # compact JSON: a grammar that allows any whitespace lets a small model loop on newlines until max_tokens
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
        if self.json_schema is None:
            raise ParamError("response_format.json_schema", "response_format of type json_schema needs json_schema")
        return StructuredOutputsParams(json=self.json_schema.schema_, disable_any_whitespace=True)


class SamplingRequest(Body):
    """Fields shared by /v1/completions and /v1/chat/completions, with vLLM's extras."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None  # None: the model's generation_config default, else 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None  # the caller's end-user id (OpenAI's abuse tracking): recorded nowhere, asks nothing
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id (a string in JSON) -> bias, clamped to [-100, 100]
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None  # vLLM's: one of json, regex, choice, grammar, json_object

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self, limits: RequestLimits, prompt_lengths: list[int], max_tokens: int | None, logprobs: int | None,
              max_model_len: int) -> None:
        """The bounds of `limits`, each refusal naming its field."""
        unknown = self.unknown_fields()
        if unknown and not limits.allow_unknown_fields:
            raise ParamError(unknown[0], f"{unknown[0]} is not supported by this server (unknown fields are refused, "
                                         "not ignored; `llm serve --allow-unknown-fields` drops them instead)")
        if not 1 <= self.n <= limits.max_n:
            raise ParamError("n", f"n must be between 1 and {limits.max_n}, got {self.n}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > limits.max_stop_strings:
            raise ParamError("stop", f"stop has {len(stops)} strings, more than {limits.max_stop_strings}")
        if any(len(s) > limits.max_stop_string_chars for s in stops):
            raise ParamError("stop", f"a stop string is longer than {limits.max_stop_string_chars} characters")
        if logprobs is not None and logprobs > limits.max_logprobs:
            raise ParamError(self.logprobs_field, f"{self.logprobs_field} must be at most {limits.max_logprobs}, "
                                                  f"got {logprobs}")
        total = sum(self.n * (max_tokens or max(max_model_len - length, 0)) for length in prompt_lengths)
        if total > limits.max_request_tokens:
            raise ParamError("max_tokens", f"the request asks for up to {total} tokens (n x max_tokens over its "
                                           f"prompts), more than this server's {limits.max_request_tokens}")

    logprobs_field: ClassVar[str] = "logprobs"

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        if self.response_format is not None and self.structured_outputs is not None:
            raise ParamError("structured_outputs", "give response_format or structured_outputs, not both")
        if self.response_format is not None:
            return self.response_format.structured_outputs()
        if self.structured_outputs is None:
            return None
        try:
            return StructuredOutputsParams(**self.structured_outputs)
        except TypeError as e:  # a key StructuredOutputsParams does not have
            raise ParamError("structured_outputs", f"structured_outputs: {e}") from None

    def to_sampling_params(self, defaults: dict, max_tokens: int | None, logprobs: int | None = None,
                           prompt_logprobs: int | None = None,
                           structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """Fields the request leaves out take the model's generation defaults, then SamplingParams' own."""
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if getattr(self, name) is not None}
        chosen = {k: v for k, v in defaults.items() if k != "max_tokens"} | given
        return SamplingParams(
            logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            structured_outputs=structured_outputs or self.structured_outputs_params(),
            n=self.n, seed=self.seed, stop=self.stop, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, min_tokens=self.min_tokens, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, max_tokens=max_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, **chosen)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None

    def prompts(self, limits: RequestLimits) -> list[str | list[int]]:
        p = self.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise ParamError("prompt", "prompt is empty")
        if len(prompts) > limits.max_prompts:
            raise ParamError("prompt", f"prompt has {len(prompts)} prompts, more than {limits.max_prompts}")
        return prompts


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call it answers
    reasoning: str | None = None  # an earlier reply's reasoning, sent back: the template gets it as reasoning_content
    reasoning_content: str | None = None
    # fields of a reply message that clients send back as they got them; only empty ones are taken
    refusal: None = None
    annotations: list[Any] | None = Field(None, max_length=0)
    audio: None = None
    function_call: None = None

    def to_template_input(self) -> dict:
        """The message as chat templates read it (tool calls with their arguments parsed, as HF templates expect)."""
        content = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if (self.reasoning or self.reasoning_content) is not None:
            message["reasoning_content"] = self.reasoning or self.reasoning_content
        if self.tool_calls:
            calls = []
            for i, call in enumerate(self.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError as e:
                    raise ParamError(f"messages.tool_calls.{i}.function.arguments",
                                     f"tool call arguments must be JSON text: {e}") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        return message


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template (enable_thinking)

    def chosen_tool(self) -> str | None:
        """'none', 'auto', 'required' or 'named' (after checking that the choice fits the tools given)."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if not self.tools:
            if choice != "none":
                raise ParamError("tool_choice", "tool_choice needs tools")
            return "none"
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools}:
                raise ParamError("tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools")
            return "named"
        return choice

    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    logprobs_field: ClassVar[str] = "top_logprobs"


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]
