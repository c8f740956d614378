"""logit_bias, allowed_token_ids and bad_words: each changes what its own request samples, in a batch with plain
greedy requests whose tokens stay unchanged; logprobs stay those of the model's raw distribution."""
import pytest
from conftest import PROMPTS, greedy

from llmserve import LLM, SamplingParams

PLAIN_PROMPTS = PROMPTS[:3]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def plain(llm) -> list[list[int]]:
    """Greedy tokens of PLAIN_PROMPTS, alone: what they must stay beside the requests under test."""
    return tokens(llm.generate(PLAIN_PROMPTS, greedy(10), use_tqdm=False))


def generate_beside_plain(llm, prompts: list[str], params: list[SamplingParams], plain: list[list[int]]):
    """Outputs of `prompts` run in one batch with PLAIN_PROMPTS, after checking that those kept their tokens."""
    outputs = llm.generate(PLAIN_PROMPTS + prompts, [greedy(10)] * len(PLAIN_PROMPTS) + params, use_tqdm=False)
    assert tokens(outputs[:len(PLAIN_PROMPTS)]) == plain
    return outputs[len(PLAIN_PROMPTS):]


def test_logit_bias(llm, plain):
    prompt = PROMPTS[1]
    first = llm.generate(prompt, greedy(6), use_tqdm=False)[0].outputs[0].token_ids[0]
    forced_token = llm.get_tokenizer().encode(" banana", add_special_tokens=False)[-1]
    params = [greedy(6, logit_bias={forced_token: 100}, logprobs=0),
              greedy(6, logit_bias={str(first): -1e9}),  # JSON's string keys; clamped to -100
              greedy(6, logit_bias={forced_token: 5.0, first: -5.0})]
    forced, banned, mild = generate_beside_plain(llm, [prompt] * 3, params, plain)
    assert forced.outputs[0].token_ids == [forced_token] * 6
    assert forced.outputs[0].logprobs[0][forced_token].logprob < -5  # the model's, not the biased one's
    assert banned.outputs[0].token_ids[0] != first
    assert params[1].logit_bias == {first: -100.0}
    assert mild.outputs[0].token_ids  # several biases in one request, beside others


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}])
def test_allowed_token_ids(llm, plain, sampling):
    allowed = sorted(set(llm.get_tokenizer().encode(" yes no maybe . ! the cat dog", add_special_tokens=False)))
    prompts = PROMPTS[3:5]
    free = tokens(llm.generate(prompts, greedy(10), use_tqdm=False))
    assert not all(set(t) <= set(allowed) for t in free)  # the restriction does it
    params = SamplingParams(max_tokens=10, ignore_eos=True, allowed_token_ids=allowed, **sampling)
    for out in generate_beside_plain(llm, prompts, [params] * 2, plain):
        assert len(out.outputs[0].token_ids) == 10 and set(out.outputs[0].token_ids) <= set(allowed)


def test_bad_words(llm, plain):
    prompts = [PROMPTS[1], PROMPTS[4]]  # " Paris." (one token) and " 5, 6, 7, 8," (" 6" after "5, ")
    words = ["Paris", "5, 6"]
    free = llm.generate(prompts, greedy(12), use_tqdm=False)
    assert all(word in o.outputs[0].text for word, o in zip(words, free))
    outputs = generate_beside_plain(llm, prompts, [greedy(12, bad_words=[w]) for w in words], plain)
    for word, out in zip(words, outputs):
        assert word not in out.outputs[0].text and len(out.outputs[0].token_ids) == 12, out.outputs[0].text
    assert llm.engine.tokenize_bad_words(["5, 6"]) == [[37, 28, 216, 38], [216, 37, 28, 216, 38]]


@pytest.mark.parametrize("kwargs, field", [
    ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": {"x": 1.0}}, "logit_bias"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [3, -1]}, "allowed_token_ids"),
    ({"allowed_token_ids": 7}, "allowed_token_ids"), ({"bad_words": [" "]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"logit_bias": {10**6: 1.0}}, "logit_bias"), ({"allowed_token_ids": [5, 49152]}, "allowed_token_ids"),
])
def test_token_ids_outside_the_vocabulary_queue_nothing(llm, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} has token ids outside the vocabulary"):
        llm.generate(["fine", "not fine"], [greedy(4), greedy(4, **kwargs)], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_used_blocks == 0


def test_async_scheduling_gives_same_outputs(llm):
    """Forced on the CPU: bias and allowed tokens sample in steps launched ahead, bad words wait for their
    tokens."""
    pipelined = LLM(dtype="float32", async_scheduling=True)
    params = [greedy(16, logit_bias={11: 4.0, 30: -3.0}), greedy(16, allowed_token_ids=list(range(200, 3000))),
              greedy(8, bad_words=["5, 6"]), greedy(16)]
    ours, theirs = (engine.generate(PROMPTS[2:6], params, use_tqdm=False) for engine in (pipelined, llm))
    assert tokens(ours) == tokens(theirs)
    assert pipelined.engine.stats["async_steps"] > 0
