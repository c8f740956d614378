"""Structured outputs: grammars (a JSON schema, a regex, a choice, an EBNF grammar) compiled by xgrammar into
token masks, so that every sampled token keeps the output inside the grammar.

xgrammar is imported on first use: it adds half a second to `import llmserve`.
"""
import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmserve.errors import ParamError

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)

KINDS = ("json", "regex", "choice", "grammar", "json_object")
CACHE_LIMIT_BYTES = 512 << 20  # compiled grammars kept (least recently used go first), as vLLM's default


@dataclass
class StructuredOutputsParams:
    """What the output must be (vLLM's names): exactly one of `json` (a JSON schema, as a dict or a string),
    `regex`, `choice` (one of these strings), `grammar` (EBNF, as xgrammar reads it) or `json_object=True`
    (any JSON object)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens

    def __post_init__(self) -> None:
        chosen = self.kinds_set()
        if len(chosen) != 1:
            raise ParamError("structured_outputs", f"structured_outputs must set exactly one of {', '.join(KINDS)}; "
                             f"got {', '.join(chosen) or 'none'}")
        problem = self.type_problem()
        if problem:
            raise ParamError(f"structured_outputs.{chosen[0]}", f"structured_outputs.{chosen[0]} {problem}")

    def kinds_set(self) -> list[str]:
        return [name for name in KINDS if (self.json_object is True if name == "json_object"
                                           else getattr(self, name) is not None)]

    def type_problem(self) -> str | None:
        if self.json is not None and not isinstance(self.json, (str, dict)):
            return "must be a JSON schema, as a dict or a string"
        if self.regex is not None and not (isinstance(self.regex, str) and "\x00" not in self.regex):
            return "must be a string without NUL characters"
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) for c in self.choice)):
            return "must be a non-empty list of strings"
        if self.grammar is not None and not isinstance(self.grammar, str):
            return "must be an EBNF grammar string"
        return None


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are the choices (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def without_source_location(error: Exception) -> str:
    """xgrammar's message without the C++ time stamp, file and line it starts with."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?", "", str(error)).strip()


class GrammarCompiler:
    """Compiles StructuredOutputsParams into xgrammar grammars for one tokenizer. xgrammar's compiler caches
    what it compiled (keyed by the grammar's text and options), so the same schema compiles once; it is
    thread-safe, so compiling may happen off the engine's thread."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self.lock = threading.Lock()
        self.compiler: "xgrammar.GrammarCompiler | None" = None

    def xgrammar_compiler(self) -> "xgrammar.GrammarCompiler":
        with self.lock:  # built on first use (0.1 s for the tokenizer's vocabulary), once across threads
            if self.compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_token_ids)
                self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=True,
                                                         cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self.compiler

    @property
    def cache_size_bytes(self) -> int:
        return self.compiler.get_cache_size_bytes() if self.compiler is not None else 0

    def compile(self, spec: StructuredOutputsParams) -> "xgrammar.CompiledGrammar":
        """The compiled grammar (from the cache when it was compiled before); a ValueError when it does not
        compile."""
        compiler = self.xgrammar_compiler()
        any_whitespace = not spec.disable_any_whitespace
        try:
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                return compiler.compile_json_schema(schema, any_whitespace=any_whitespace)
            if spec.json_object:
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, TypeError, ValueError) as error:  # TypeError, ValueError: json.dumps refused it
            reason = without_source_location(error)
            kind = spec.kinds_set()[0]
            raise ParamError(f"structured_outputs.{kind}",
                             f"structured_outputs.{kind} does not compile: {reason}") from None


def new_matcher(grammar: "xgrammar.CompiledGrammar") -> "xgrammar.GrammarMatcher":
    """A matcher at the start of the grammar: one per sequence."""
    import xgrammar

    return xgrammar.GrammarMatcher(grammar)


def accept_grammar_token(matcher: "xgrammar.GrammarMatcher", token: int) -> bool:
    """Advance the matcher by a sampled token. True when the output ends here: the grammar is complete (its
    stop token was accepted), or the token does not fit it (only when every token was masked)."""
    if not matcher.accept_token(token):
        logger.warning("token %d does not fit the grammar (every token was masked?): the output ends", token)
        return True
    return matcher.is_terminated()


def mask_to_grammars(logits: torch.Tensor, matchers: dict[int, "xgrammar.GrammarMatcher"]) -> None:
    """In place: -inf at the tokens that the grammar of each row in `matchers` does not allow next."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for row, matcher in matchers.items():
        matcher.fill_next_token_bitmask(bitmask, row)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=list(matchers))
