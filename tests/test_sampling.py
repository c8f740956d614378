"""Sampling: seeds, n, stop conditions, penalties and the top-k/top-p/min-p filters."""
from conftest import PROMPTS, greedy

from llmserve import SamplingParams


def texts(outputs):
    return [[c.text for c in o.outputs] for o in outputs]


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=24)
    first = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    second = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert texts(first) == texts(second)
    other = llm.generate(PROMPTS[:4], SamplingParams(temperature=0.8, top_p=0.95, seed=99, max_tokens=24),
                         use_tqdm=False)
    assert texts(other) != texts(first)


def test_seed_does_not_depend_on_batch(llm):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16)
    alone = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(PROMPTS[:5], [SamplingParams(temperature=1.0, max_tokens=16)] + [params] * 4, use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_n_returns_n_outputs(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=12), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_filters_that_keep_one_token_equal_greedy(llm):
    expected = llm.generate(PROMPTS[:3], greedy(10), use_tqdm=False)
    for filters in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        got = llm.generate(PROMPTS[:3], SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, **filters),
                           use_tqdm=False)
        assert texts(got) == texts(expected), filters


def test_stop_string_cuts_text(llm):
    base = llm.generate(PROMPTS[4], greedy(12), use_tqdm=False)[0].outputs[0]
    stop = base.text[3:6]
    out = llm.generate(PROMPTS[4], greedy(12, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:base.text.index(stop)]
    kept = llm.generate(PROMPTS[4], greedy(12, stop=stop, include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == base.text[:base.text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate(PROMPTS[2], greedy(10), use_tqdm=False)[0].outputs[0]
    stop_token = base.token_ids[4]
    out = llm.generate(PROMPTS[2], greedy(10, stop_token_ids=[stop_token]), use_tqdm=False)[0].outputs[0]
    first = base.token_ids.index(stop_token)
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    held = llm.generate(PROMPTS[2], greedy(10, stop_token_ids=[stop_token], min_tokens=10), use_tqdm=False)
    assert stop_token not in held[0].outputs[0].token_ids and len(held[0].outputs[0].token_ids) == 10


def test_eos_ends_generation(llm):
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200),
                   use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] in llm.engine.eos_token_ids and "<|im_end|>" not in out.text


def test_penalties_change_repetition(llm):
    prompt = "one one one one one one one one"
    plain = llm.generate(prompt, greedy(16), use_tqdm=False)[0].outputs[0].token_ids
    for penalty in ({"repetition_penalty": 2.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = llm.generate(prompt, greedy(16, **penalty), use_tqdm=False)[0].outputs[0].token_ids
        assert penalised != plain, penalty
        assert len(set(penalised)) >= len(set(plain)), penalty


def test_top_logprobs(llm):
    out = llm.generate(PROMPTS[1], greedy(5, logprobs=3), use_tqdm=False)[0].outputs[0]
    for token, step in zip(out.token_ids, out.logprobs):
        assert len(step) in (3, 4) and step[token].rank == 1
        ranked = sorted(step.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked][:3] == [1, 2, 3]
        assert ranked[0].logprob >= ranked[1].logprob >= ranked[2].logprob
        assert step[token].decoded_token == llm.get_tokenizer().decode([token])


def test_chat_knows_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
