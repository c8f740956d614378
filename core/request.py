from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

from llmserve.outputs import PositionLogprobs
from llmserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence being generated: its tokens, how far its KV is computed, and its blocks."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + output never exceed this (max_model_len, or prompt + max_tokens)
    eos_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    group_id: str = ""  # the user's request id; n > 1 completions share it
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # each bad word, tokenized
    grammar: "xgrammar.GrammarMatcher | None" = None  # structured outputs: where the output is in its grammar
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: object = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.group_id = self.group_id or self.request_id
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def samples_from_its_tokens(self) -> bool:
        """Whether sampling its next token reads the tokens it generated so far (penalties, min_tokens, bad
        words, a grammar), so a step for it cannot start before the previous step's token is read."""
        params = self.params
        return (params.uses_penalties or self.num_output_tokens < params.min_tokens
                or bool(self.bad_words_token_ids) or self.grammar is not None)
