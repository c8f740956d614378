"""Tokenizer helpers: chat templates, incremental detokenization and stop strings."""
import os

from llmserve.errors import ParamError
from llmserve.request import Request

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so its first word gets the right spacing


def tokenize(tokenizer, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids: a text encoded, token ids as given."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ParamError("prompt", "prompt must be token ids: the engine runs without a tokenizer "
                                       "(skip_tokenizer_init)")
        return tokenizer.encode(prompt) if prompt else []
    return list(prompt)


def load_chat_template(template: str | None) -> str | None:
    """A chat template given inline or as the path of a file holding it."""
    if template and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    return template


RESERVED_TEMPLATE_NAMES = {"messages", "conversation", "tools", "add_generation_prompt", "chat_template", "tokenize"}


def apply_chat_template(tokenizer, conversation: list[dict], chat_template: str | None,
                        add_generation_prompt: bool = True, tools: list[dict] | None = None,
                        template_kwargs: dict | None = None) -> list[int]:
    """The conversation's prompt tokens; `tools` (OpenAI function definitions) and `template_kwargs` (extra template
    variables, e.g. enable_thinking) go to the template."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer; the engine runs without one (skip_tokenizer_init)")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model has no chat template; pass chat_template (a Jinja template string or file)")
    reserved = sorted(RESERVED_TEMPLATE_NAMES & set(template_kwargs or {}))
    if reserved:
        raise ParamError("chat_template_kwargs", f"chat_template_kwargs may not set {', '.join(reserved)}")
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=load_chat_template(chat_template),
                                             tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools, **(template_kwargs or {}))
    except TemplateError as e:  # the template's own checks (roles must alternate, no system role, ...)
        raise ParamError("messages", f"the chat template refused these messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns one token at a time into text, holding back bytes until they form whole characters."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self.decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text):]


def append_text_and_check_stop(request: Request, delta: str, check_stops: bool = True) -> None:
    """Add decoded text; on a stop string, cut the text there and finish the request."""
    old_length = len(request.text)
    request.text += delta
    stops = request.params.stop_strings
    if not stops or not delta or not check_stops:
        return
    longest = max(len(s) for s in stops)
    search_from = max(0, old_length - longest + 1)
    found = [(at, stop) for stop in stops if (at := request.text.find(stop, search_from)) != -1]
    if found:
        at, stop = min(found)
        request.text = request.text[:at + len(stop) if request.params.include_stop_str_in_output else at]
        request.finish_reason, request.stop_reason = "stop", stop


def streamable_text(text: str, stop_strings: list[str], finished: bool) -> str:
    """The part of a growing output that is safe to send: a tail that may be the start of a stop string waits."""
    if finished:
        return text
    held = max((k for stop in stop_strings for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[:len(text) - held]
