"""Bad input: a clear ValueError naming the problem, nothing queued, and the engine keeps serving."""
import os

import pytest
from conftest import greedy

from llmserve import LLM, SamplingParams


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max_tokens"), ("temperature", -0.5, "temperature"), ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"), ("n", 0, "n "), ("top_k", -3, "top_k"), ("min_p", 2.0, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("stop", [""], "stop"),
])
def test_bad_sampling_params(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_bad_prompts_queue_nothing(llm):
    long_prompt = [100] * (llm.engine.max_model_len + 5)
    for prompts, message in ((["fine", ""], "prompt is empty"), ([long_prompt], "max_model_len"),
                             ([[1, 2, 10**9]], "token ids")):
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, greedy(4), use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.kv.num_used_blocks == 0
    assert llm.generate("Still serving?", greedy(3), use_tqdm=False)[0].outputs[0].token_ids


def test_mismatched_params_list(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [greedy(2)], use_tqdm=False)


def test_unknown_model_path():
    with pytest.raises(ValueError, match="not found"):
        LLM(model="/no/such/model.gguf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ValueError, match="broken.gguf"):
        LLM(model=str(bad))


def test_corrupt_safetensors(tmp_path):
    from llmserve.loader import find_model

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(find_model(None), name), "rb").read())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64))
    with pytest.raises(ValueError, match="corrupt or unreadable weights"):
        LLM(model=str(tmp_path))


def test_hub_id_without_network():
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        LLM(model="no-such-org/no-such-model")


def test_bad_engine_args():
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=3)
    with pytest.raises(ValueError, match="block_size.*up to 256"):
        LLM(block_size=512)
    with pytest.raises(ValueError, match="unknown engine argument.*not_an_option"):
        LLM(not_an_option=1)
