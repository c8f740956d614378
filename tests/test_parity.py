"""Greedy parity with HF transformers on the embedded model (same GGUF weights, float32)."""
from conftest import PROMPTS, greedy, hf_greedy


def test_batch_matches_hf_tokens_and_logprobs(llm, hf_model):
    max_tokens = [4 + 3 * i for i in range(len(PROMPTS))]
    outputs = llm.generate(PROMPTS, [greedy(m, logprobs=0) for m in max_tokens], use_tqdm=False)
    assert [o.prompt for o in outputs] == PROMPTS
    for prompt, m, out in zip(PROMPTS, max_tokens, outputs):
        completion = out.outputs[0]
        ref_tokens, ref_logprobs = hf_greedy(hf_model, out.prompt_token_ids, m)
        assert completion.token_ids == ref_tokens, prompt
        assert len(completion.token_ids) == m and completion.finish_reason == "length"
        ours = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_logprobs)) < 1e-3, prompt
        assert abs(completion.cumulative_logprob - sum(ref_logprobs)) < 1e-2


def test_prompt_logprobs_match_hf(llm, hf_model):
    import torch

    prompt = PROMPTS[3]
    out = llm.generate(prompt, greedy(1, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()) < 1e-3
        top = ref[pos - 1].topk(2).indices.tolist()
        assert set(top) <= set(entry) and entry[top[0]].rank == 1
