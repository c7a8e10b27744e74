"""The requests of OpenAI's chat and completions APIs, as far as this server takes them. Unknown fields are
refused (a misspelt option must not be ignored silently); known fields that would change the result in a way this
server cannot honour are refused unless they hold their no-effect value."""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from tp_infer.engine.sampling import REQUEST_FIELDS, SEED_RANGE


class APIError(Exception):
    """An error answered with OpenAI's error object; `param` names the culprit field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def no_lone_surrogates(text: str) -> str:
    """JSON may spell a lone surrogate (\\ud800), which no encoder can turn into bytes: refuse it where it enters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(no_lone_surrogates)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Text
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(Strict):
    include_usage: bool = False


# fields whose only accepted value is the one that changes nothing: (field, that value, why it is refused)
NO_EFFECT = {
    "n": (1, "only n=1 is supported"),
    "frequency_penalty": (0, "frequency_penalty is not supported"),
    "presence_penalty": (0, "presence_penalty is not supported"),
    "logprobs": (None, "logprobs are not supported"),
    "top_logprobs": (None, "top_logprobs are not supported"),
    "logit_bias": (None, "logit_bias is not supported"),
    "echo": (False, "echo is not supported"),
    "suffix": (None, "suffix is not supported"),
    "best_of": (None, "best_of is not supported"),
    "tools": (None, "tools are not supported"),
    "tool_choice": (None, "tool_choice is not supported"),
    "response_format": (None, "response_format is not supported"),
}


class SamplingRequest(Strict):
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # for the client's own bookkeeping: no effect
    # keeps this request's cached prefixes apart from those of requests with another salt (vLLM's name)
    cache_salt: Text | None = Field(None, min_length=1, max_length=1024)
    # vLLM's and SGLang's sampling extensions, with their meanings (SamplingParams checks the values, by name)
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    n: int = 1
    frequency_penalty: float = 0
    presence_penalty: float = 0
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        for name in self.model_fields_set & NO_EFFECT.keys():
            value, why = NO_EFFECT[name]
            given = getattr(self, name)
            if given != value and not (name in ("logprobs", "logit_bias") and not given):
                raise APIError(400, f"{why} (got {name}={given!r})", name)
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream=true", "stream_options")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_fields(self) -> dict:
        """The SamplingParams fields this request sets, by their SamplingParams names (max_new_tokens aside)."""
        return {name: getattr(self, name) for name in REQUEST_FIELDS if getattr(self, name) is not None}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    # more variables for the chat template (DeepSeek V3.1's reads `thinking`), vLLM's and SGLang's name
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @classmethod
    def limited(cls, max_messages: int) -> type["ChatCompletionRequest"]:
        """This request taking at most max_messages messages: a longer list is refused by its length alone, before
        any message in it is validated (and /openapi.json says maxItems)."""
        messages = (list[ChatMessage], Field(min_length=1, max_length=max_messages))
        return create_model(cls.__name__, __base__=cls, __module__=cls.__module__, messages=messages)


class CompletionRequest(SamplingRequest):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# ---- the answers, as /openapi.json describes them ----
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every answer that is not a 200."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens found in the cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tp_infer"
    max_model_len: int  # the longest conversation, prompt and reply, that this server runs


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "failed"]
