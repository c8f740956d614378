"""Batch invariance: alone, in a batch, under preemption and with prefix caching, the tokens are the same."""
from conftest import PROMPTS, greedy

from llmserve import LLM

MAX_TOKENS = [6 + 2 * i for i in range(len(PROMPTS))]


def run(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    outputs = llm.generate(prompts, [greedy(m) for m in max_tokens], use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_each_prompt_alone_equals_batch(llm):
    batched = run(llm)
    alone = [run(llm, [p], [m])[0] for p, m in zip(PROMPTS, MAX_TOKENS)]
    assert alone == batched
    assert llm.engine.kv.num_used_blocks == 0


def test_preemption_gives_same_tokens(llm):
    expected = run(llm)
    # 24 blocks of 16 tokens: far less than the batch needs, so requests are preempted and recomputed
    small = LLM(dtype="float32", kv_cache_memory_bytes=24 * 16 * 2 * 3 * 64 * 4 * 30, max_model_len=384,
                enable_prefix_caching=False, max_num_batched_tokens=128)
    assert run(small) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv.num_used_blocks == 0


def test_chunked_prefill_gives_same_tokens(llm):
    chunked = LLM(dtype="float32", max_num_batched_tokens=7, enable_prefix_caching=False)
    assert run(chunked) == run(llm)


def test_prefix_cache_hits_and_same_tokens(llm):
    prefix = "You are a helpful assistant. Answer briefly and precisely. " * 8
    prompts = [prefix + q for q in ("What is the sea?", "Name a fruit.", "Count to three.")]
    fresh = LLM(dtype="float32", enable_prefix_caching=True)
    first = fresh.generate(prompts[:1], greedy(8), use_tqdm=False)
    second = fresh.generate(prompts, greedy(8), use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 64 for o in second)
    uncached = LLM(dtype="float32", enable_prefix_caching=False).generate(prompts, greedy(8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in second] == [o.outputs[0].token_ids for o in uncached]
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids


def test_async_scheduling_gives_same_outputs():
    """Decode steps launched before the previous step's tokens are read (on by default on GPUs; forced here):
    the same tokens, texts, logprobs and finish reasons, with EOS, stop strings, lengths and seeds, and no leak.
    Against a fresh engine: one whose prefix cache holds earlier tests' prompts computes a prompt's last tokens
    alone, through CPU_ATTN's kernel rather than SDPA's prefill, which moves logprobs in their last bits."""
    from llmserve import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=m, logprobs=2 if i % 3 == 0 else None,
                             stop=["\n"] if i % 4 == 1 else None) for i, m in enumerate(MAX_TOKENS)]
    params[2] = SamplingParams(temperature=0.8, seed=7, max_tokens=20, n=2)
    pipelined = LLM(dtype="float32", async_scheduling=True)
    llm = LLM(dtype="float32", async_scheduling=False)
    for ours, theirs in zip(pipelined.generate(PROMPTS, params, use_tqdm=False),
                            llm.generate(PROMPTS, params, use_tqdm=False)):
        for a, b in zip(ours.outputs, theirs.outputs):
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                              b.stop_reason)
            assert a.cumulative_logprob == b.cumulative_logprob
    assert pipelined.engine.stats["async_steps"] > 10
    assert pipelined.engine.kv.num_used_blocks == 0 and not pipelined.engine.has_unfinished_requests()


def test_abort_during_async_continuation_frees_blocks():
    from llmserve import SamplingParams

    llm = LLM(dtype="float32", async_scheduling=True)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while engine.stats["async_steps"] < 3:
        engine.step()
    assert engine.inflight  # a continuation is running while its parent step's tokens are read
    engine.abort("1")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["0", "2"] and all(len(o.outputs[0].token_ids) == 40 for o in done.values())
    assert engine.kv.num_used_blocks == 0 and not engine.scheduler.running


def test_blocks_of_256_tokens_give_the_same_tokens(llm):
    """Pages of 256 tokens (what FlashAttention-2's paged kernels take) through the whole engine on TORCH_SDPA."""
    from llmserve import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["The capital of France is", "word " * 300]
    big = LLM(dtype="float32", block_size=256, max_num_batched_tokens=128)
    assert [o.outputs[0].token_ids for o in big.generate(prompts, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
