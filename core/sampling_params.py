import math
from dataclasses import dataclass, field

from llmserve.errors import ParamError
from llmserve.structured_outputs import StructuredOutputsParams

LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit bias; larger ones are clamped to it


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt (the fields vLLM users know)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, clamped to [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # never generated (each word's last token is banned after the others)
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else self.bad_words
        self._validate()
        if self.logit_bias:
            self.logit_bias = {int(token): max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(bias)))
                               for token, bias in self.logit_bias.items()}
        if self.allowed_token_ids:
            self.allowed_token_ids = [int(token) for token in self.allowed_token_ids]

    def _validate(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ParamError(name, f"{name} {rule}, got {getattr(self, name)!r}")

        check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be -1 (off) or an integer >= 1")
        check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(self.min_tokens >= 0, "min_tokens", "must be >= 0")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        check(self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0")
        check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", "must be >= 0")
        check(all(isinstance(s, str) and s for s in self.stop_strings), "stop", "must be non-empty strings")
        bias, allowed = self.logit_bias, self.allowed_token_ids
        check(bias is None or (isinstance(bias, dict) and all(
            is_token_id(t) and isinstance(b, (int, float)) and math.isfinite(b) for t, b in bias.items())),
            "logit_bias", "must map token ids (integers >= 0) to finite numbers")
        check(allowed is None or (isinstance(allowed, list) and allowed and all(map(is_token_id, allowed))),
              "allowed_token_ids", "must be a non-empty list of token ids (integers >= 0)")
        check(self.bad_words is None or (isinstance(self.bad_words, list)
                                         and all(isinstance(w, str) and w.strip() for w in self.bad_words)),
              "bad_words", "must be a list of non-blank strings")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs", "must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def is_token_id(value) -> bool:
    """An integer >= 0, also as a string (JSON object keys are strings)."""
    if isinstance(value, str):
        return value.isdigit()
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
