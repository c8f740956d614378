"""Structured outputs and logit controls on the platform's device (a CUDA GPU when there is one: CUDA graphs and async
scheduling, else the CPU with async scheduling forced on), on a random model with a small tokenizer trained here, so
that it needs no model package on the machine."""
import json
import re

import pytest
import torch

from llmserve import LLM, SamplingParams, StructuredOutputsParams
from llmserve.plugins.conformance import save_random_checkpoint

GPU = torch.cuda.is_available()
CORPUS = ['{"name": "Ann", "age": 31, "tags": ["a", "b"], "ok": true}', "The quick brown fox jumps over 0123456789"]
REGEX = r'\{"n": [0-9]{1,3}\}'
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "size": {"enum": [1, 2, 3]}},
          "required": ["color", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("random-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 50, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, architectures=["LlamaForCausalLM"])
    save_random_checkpoint(config, folder)
    return folder


def engine(folder, async_scheduling: bool) -> LLM:
    return LLM(model=str(folder), dtype="bfloat16" if GPU else "float32", async_scheduling=async_scheduling,
               max_num_seqs=8, kv_cache_memory_bytes=None if GPU else 64 << 20)


def test_constrained_and_free_requests_in_one_batch(model_folder):
    prompts = ["The quick", "0123", "fox", "The", "jumps over", "name"]
    free = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True) for _ in range(3)]
    constrained = [
        SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=REGEX)),
        SamplingParams(temperature=1.0, seed=3, max_tokens=60,
                       structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
        SamplingParams(temperature=0, max_tokens=20, allowed_token_ids=list(range(100, 140)), ignore_eos=True)]
    llm = engine(model_folder, async_scheduling=True)
    outputs = llm.generate(prompts, free + constrained, use_tqdm=False)
    assert re.fullmatch(REGEX, outputs[3].outputs[0].text), outputs[3].outputs[0].text
    assert outputs[4].outputs[0].finish_reason == "stop"  # the grammar completed
    value = json.loads(outputs[4].outputs[0].text)
    assert value["color"] in ("red", "green") and value["size"] in (1, 2, 3)
    assert set(outputs[5].outputs[0].token_ids) <= set(range(100, 140))
    alone = llm.generate(prompts[:3], free, use_tqdm=False)  # the free requests, without the constrained beside them
    assert [o.outputs[0].token_ids for o in outputs[:3]] == [o.outputs[0].token_ids for o in alone]
    assert llm.engine.stats["async_steps"] > 0  # the free batch still takes the async path


def test_synchronous_and_async_engines_agree(model_folder):
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=REGEX))
    texts = [[o.outputs[0].text for o in engine(model_folder, mode).generate(["The", "fox"], params, use_tqdm=False)]
             for mode in (False, True)]
    assert texts[0] == texts[1] and all(re.fullmatch(REGEX, t) for t in texts[0])
