"""Sampling for the whole batch on tensors: penalties, logit bias, allowed and banned tokens, grammars,
temperature, top-k/top-p/min-p, seeds, logprobs."""
from dataclasses import dataclass

import torch

from llmserve.request import Request
from llmserve.structured_outputs import mask_to_grammars


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] on the device (token_ids_host is the same, copied to the host)
    logprobs: list[float] | torch.Tensor  # of each sampled token, under the model's raw distribution
    top_ids: torch.Tensor | None  # [B, k] most likely tokens, when any request asked for logprobs
    top_logprobs: torch.Tensor | None
    sampled_ranks: list[int] | torch.Tensor | None  # rank of each sampled token (1 = most likely)
    token_ids_host: list[int] | torch.Tensor | None = None
    ready: torch.Event | None = None  # on an accelerator: recorded after the copies to the host were queued

    def start_host_copy(self) -> None:
        """Queue the copies to (pinned) host memory now, so that reading them later waits for this step only."""
        to_host = lambda t: t.to("cpu", non_blocking=True) if t is not None else None
        self.token_ids_host, self.logprobs = to_host(self.token_ids), to_host(self.logprobs)
        self.top_ids, self.top_logprobs = to_host(self.top_ids), to_host(self.top_logprobs)
        self.sampled_ranks = to_host(self.sampled_ranks)
        if self.token_ids.device.type != "cpu":
            self.ready = torch.Event(self.token_ids.device)
            self.ready.record()

    def to_host(self) -> "SamplerOutput":
        if self.ready is not None:
            self.ready.synchronize()
        ranks = self.sampled_ranks.tolist() if self.sampled_ranks is not None else None
        return SamplerOutput(self.token_ids, self.logprobs.tolist(), self.top_ids, self.top_logprobs, ranks,
                             self.token_ids_host.tolist())


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of `values` on the device, copied from pinned memory: a copy from pageable memory would wait for all
    the work queued before it (the model's step, which may still wait for another rank)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type != "cpu")
    return host.to(device, non_blocking=True)


def sample(logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
    logits = logits.float()
    params = [r.params for r in requests]
    want_logprobs = any(p.logprobs is not None for p in params)
    log_total = torch.logsumexp(logits, dim=-1)  # one pass: the full log_softmax only when logprobs are asked for
    raw_logprobs = logits - log_total[:, None] if want_logprobs else None
    raw_chosen_logits = logits  # the masks work in place, but never at a token they let be sampled
    logits = apply_penalties(logits, requests)
    logits = apply_logit_bias(logits, requests)
    keep_only_allowed(logits, requests)
    ban_tokens(logits, requests)
    keep_to_grammars(logits, requests)
    token_ids = logits.argmax(dim=-1)
    if not all(p.greedy for p in params):
        greedy = to_device([p.greedy for p in params], device=logits.device)
        token_ids = torch.where(greedy, token_ids, sample_random(logits, requests))
    sampled_logprobs = raw_chosen_logits.gather(1, token_ids[:, None]).squeeze(1) - log_total
    want = max((p.logprobs or 0) for p in params)
    top_ids = top_logprobs = ranks = None
    if want_logprobs:
        top_logprobs, top_ids = raw_logprobs.topk(max(want, 1), dim=-1)
        ranks = (raw_logprobs > sampled_logprobs[:, None]).sum(-1) + 1
    output = SamplerOutput(token_ids, sampled_logprobs, top_ids, top_logprobs, ranks)
    output.start_host_copy()
    return output


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    if not any(r.params.uses_penalties for r in requests):
        return logits
    batch, vocab = logits.shape
    device = logits.device
    output_counts = torch.zeros(batch, vocab, device=device)
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    for i, r in enumerate(requests):  # only when penalties are asked for: one scatter per request
        if r.num_output_tokens:
            output_counts[i].index_add_(0, to_device(r.output_token_ids, device=device),
                                        torch.ones(r.num_output_tokens, device=device))
        seen[i, to_device(r.token_ids, device=device)] = True
    column = lambda name: to_device([getattr(r.params, name) for r in requests], device=device)[:, None]
    repetition = column("repetition_penalty")
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    logits = logits - column("frequency_penalty") * output_counts
    return logits - column("presence_penalty") * (output_counts > 0)


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The biases added (out of place: a biased token may be sampled, and its raw logit gives its logprob)."""
    biased = [(i, token, bias) for i, r in enumerate(requests)
              for token, bias in (r.params.logit_bias or {}).items()]
    if not biased:
        return logits
    rows, tokens, biases = zip(*biased)
    device = logits.device
    index = (to_device(rows, device=device), to_device(tokens, device=device))
    return logits.index_put(index, to_device(biases, device=device, dtype=logits.dtype), accumulate=True)


def keep_only_allowed(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place: -inf at every token outside allowed_token_ids, for the requests that set it."""
    restricted = [i for i, r in enumerate(requests) if r.params.allowed_token_ids]
    if not restricted:
        return
    rows = [i for i in restricted for _ in requests[i].params.allowed_token_ids]
    tokens = [t for i in restricted for t in requests[i].params.allowed_token_ids]
    blocked = torch.zeros_like(logits, dtype=torch.bool)
    blocked[restricted] = True
    blocked[to_device(rows, device=logits.device), to_device(tokens, device=logits.device)] = False
    logits.masked_fill_(blocked, float("-inf"))


def ban_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place: -inf at the tokens each request may not sample now."""
    rows, tokens = [], []
    for i, r in enumerate(requests):
        banned = early_stop_tokens(r) | bad_word_endings(r)
        rows += [i] * len(banned)
        tokens += banned
    if rows:
        device = logits.device
        logits[to_device(rows, device=device), to_device(tokens, device=device)] = float("-inf")


def keep_to_grammars(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place: -inf at the tokens that a request's grammar does not allow next."""
    matchers = {i: r.grammar for i, r in enumerate(requests) if r.grammar is not None}
    if matchers:
        mask_to_grammars(logits, matchers)


def early_stop_tokens(request: Request) -> set[int]:
    """Below min_tokens, EOS and the stop tokens cannot be sampled."""
    params = request.params
    if request.num_output_tokens >= params.min_tokens:
        return set()
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(request.eos_token_ids))


def bad_word_endings(request: Request) -> set[int]:
    """The last token of each bad word whose other tokens are the last ones generated (as vLLM)."""
    if not request.bad_words_token_ids:
        return set()
    output = request.output_token_ids
    return {word[-1] for word in request.bad_words_token_ids
            if len(word) - 1 <= len(output) and output[len(output) - len(word) + 1:] == word[:-1]}


def sample_random(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    device = logits.device
    column = lambda values: to_device(values, device=device, dtype=torch.float32)[:, None]
    temperature = column([r.params.temperature or 1.0 for r in requests])
    logits = logits / temperature
    top_k = [r.params.top_k for r in requests]
    top_p = [r.params.top_p for r in requests]
    if any(top_k) or any(p < 1 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        ranks = torch.arange(vocab, device=device)
        k = column([k or vocab for k in top_k])
        cut = ranks[None, :] >= k
        probs = sorted_logits.softmax(dim=-1)
        cut |= (probs.cumsum(dim=-1) - probs) >= column(top_p)  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    min_p = [r.params.min_p for r in requests]
    if any(min_p):
        probs = probs.masked_fill(probs < column(min_p) * probs.amax(dim=-1, keepdim=True), 0)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; per-request generators make seeds exact.
    noise = torch.empty_like(probs).exponential_()
    for i, r in enumerate(requests):
        if r.generator is not None:
            noise[i].exponential_(generator=r.generator)
    return (probs / noise).argmax(dim=-1)
