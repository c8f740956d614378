"""Engine outputs as OpenAI response bodies and stream chunks (completions and chat completions)."""
import time

from llmserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server.parsers import ReplyParser, ReplyParts
from llmserve.tokenizer import streamable_text

MIN_LOGPROB = -9999.0  # JSON has no -inf


class Renderer:
    """Shared by both APIs: ids, usage, and the deltas each stream chunk carries."""

    object_name = chunk_object = ""

    def __init__(self, request_id: str, model: str, tokenizer, prompt_token_ids: list[list[int]],
                 params: SamplingParams) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_token_ids = prompt_token_ids
        self.id, self.created = request_id, int(time.time())
        self.sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, choice) -> (chars, tokens) sent

    def usage(self, outputs: list[RequestOutput]) -> dict:
        prompt = sum(len(ids) for ids in self.prompt_token_ids)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = [self.choice(i, o, c) for i, o in enumerate(outputs) for c in o.outputs]
        return self.envelope(self.object_name, choices) | {"usage": self.usage(outputs)}

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict:
        return self.envelope(self.chunk_object, []) | {"usage": self.usage(outputs)}

    def chunks(self, index: int, output: RequestOutput):
        for c in output.outputs:
            key = (index, c.index)
            first = key not in self.sent
            chars, tokens = self.sent.get(key, (0, 0))
            if chars < 0:
                continue  # this choice already sent its last chunk
            text = streamable_text(c.text, self.params.stop_strings, c.finished)
            if len(text) == chars and len(c.token_ids) == tokens and not c.finished and not first:
                continue
            self.sent[key] = (-1, -1) if c.finished else (len(text), len(c.token_ids))
            choice = self.delta(index, output, c, chars, text[chars:], tokens, first)
            yield self.envelope(self.chunk_object, [choice])

    def choice(self, index: int, output: RequestOutput, c: CompletionOutput) -> dict: ...

    def delta(self, index: int, output: RequestOutput, c: CompletionOutput, from_char: int, text: str,
              from_token: int, first: bool) -> dict: ...


def logprob_value(value: float) -> float:
    return max(value, MIN_LOGPROB)


class CompletionRenderer(Renderer):
    object_name, chunk_object = "text_completion", "text_completion"

    def __init__(self, request_id, model, tokenizer, prompt_token_ids, params, echo: bool) -> None:
        super().__init__(request_id, model, tokenizer, prompt_token_ids, params)
        self.echo = echo

    def choice_index(self, index: int, c: CompletionOutput) -> int:
        return index * self.params.n + c.index

    def choice(self, index, output, c) -> dict:
        return self.delta(index, output, c, 0, c.text, 0, True)

    def delta(self, index, output, c, from_char, text, from_token, first) -> dict:
        token_ids, positions = c.token_ids[from_token:], (c.logprobs or [])[from_token:]
        offset = from_char
        if self.echo:
            prompt_text = output.prompt if output.prompt is not None else self.tokenizer.decode(output.prompt_token_ids)
            offset += 0 if first else len(prompt_text)
            if first:
                text = prompt_text + text
                token_ids = output.prompt_token_ids + token_ids
                positions = (output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + positions
        logprobs = self.logprobs(token_ids, positions, offset) if self.params.logprobs is not None else None
        return {"index": self.choice_index(index, c), "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def logprobs(self, token_ids: list[int], positions: list[PositionLogprobs | None], offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for token_id, position in zip(token_ids, positions):
            token = position[token_id].decoded_token if position else self.tokenizer.decode([token_id])
            tokens.append(token)
            values.append(logprob_value(position[token_id].logprob) if position else None)
            tops.append({lp.decoded_token: logprob_value(lp.logprob) for lp in position.values()} if position else None)
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class ChatRenderer(Renderer):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, request_id, model, tokenizer, prompt_token_ids, params, logprobs: bool,
                 reply_parser: ReplyParser | None = None) -> None:
        super().__init__(request_id, model, tokenizer, prompt_token_ids, params)
        self.want_logprobs = logprobs
        self.reply_parser = reply_parser
        self.parts_sent: dict[int, ReplyParts] = {}  # choice -> what its stream has sent of each part

    def parts(self, c: CompletionOutput, text: str) -> ReplyParts:
        return self.reply_parser.parse(text, c.finished) if self.reply_parser else ReplyParts(text)

    def finish_reason(self, c: CompletionOutput, parts: ReplyParts) -> str | None:
        return "tool_calls" if parts.tool_calls and c.finish_reason == "stop" else c.finish_reason

    def choice(self, index, output, c) -> dict:
        parts = self.parts(c, c.text)
        message = {"role": "assistant", "content": parts.content or (None if parts.tool_calls else "")}
        if self.reply_parser and self.reply_parser.reasoning:
            message["reasoning"] = parts.reasoning
        if parts.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in parts.tool_calls]
        return {"index": c.index, "message": message, "logprobs": self.logprobs(c, 0),
                "finish_reason": self.finish_reason(c, parts), "stop_reason": c.stop_reason}

    def delta(self, index, output, c, from_char, text, from_token, first) -> dict:
        delta = {"role": "assistant"} if first else {}
        parts = self.parts(c, streamable_text(c.text, self.params.stop_strings, c.finished))
        sent = self.parts_sent.get(c.index, ReplyParts("", "" if parts.reasoning is not None else None))
        if parts.reasoning is not None and len(parts.reasoning) > len(sent.reasoning or ""):
            delta["reasoning"] = parts.reasoning[len(sent.reasoning or ""):]
        if len(parts.content) > len(sent.content) or first:
            delta["content"] = parts.content[len(sent.content):]
        if parts.tool_calls:
            delta["tool_calls"] = [call.to_openai(i) for i, call in enumerate(parts.tool_calls)]
        self.parts_sent[c.index] = parts
        return {"index": c.index, "delta": delta, "logprobs": self.logprobs(c, from_token),
                "finish_reason": self.finish_reason(c, parts), "stop_reason": c.stop_reason}

    def logprobs(self, c: CompletionOutput, from_token: int) -> dict | None:
        if not self.want_logprobs:
            return None
        k = self.params.logprobs

        def entry(lp) -> dict:
            return {"token": lp.decoded_token, "logprob": logprob_value(lp.logprob),
                    "bytes": list(lp.decoded_token.encode("utf-8"))}

        content = []
        for token_id, position in zip(c.token_ids[from_token:], c.logprobs[from_token:]):
            top = sorted((lp for lp in position.values() if lp.rank <= k), key=lambda lp: lp.rank)
            content.append(entry(position[token_id]) | {"top_logprobs": [entry(lp) for lp in top]})
        return {"content": content}
