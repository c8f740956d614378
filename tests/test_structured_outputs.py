"""Structured outputs (xgrammar): every sampled token keeps the output inside its JSON schema, JSON object,
regex, choice or EBNF grammar, with greedy and with random sampling; requests beside them keep their tokens; a
grammar that does not compile is refused before anything is queued."""
import json
import re
from typing import Literal

import pytest
from conftest import PROMPTS, greedy
from pydantic import BaseModel, ConfigDict, Field

from llmserve import LLM, SamplingParams, StructuredOutputsParams

SAMPLING = {"greedy": {"temperature": 0, "ignore_eos": True},  # the grammar, not EOS, has to end it
            "temperature 1": {"temperature": 1.0, "seed": 11}}


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):  # a nested object
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    address: Address


class Pet(BaseModel):  # enums
    model_config = ConfigDict(extra="forbid")
    species: Literal["cat", "dog", "parrot"]
    mood: Literal["happy", "sad"]


class Shopping(BaseModel):  # arrays
    model_config = ConfigDict(extra="forbid")
    items: list[str] = Field(min_length=1, max_length=3)
    counts: list[int] = Field(max_length=3)


def constrained(sampling: str, max_tokens: int = 200, n: int = 1, **kind) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, n=n, structured_outputs=StructuredOutputsParams(**kind),
                          **SAMPLING[sampling])


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def completions(outputs) -> list:
    return [c for o in outputs for c in o.outputs]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_json_schemas(llm, sampling):
    models = [Person, Pet, Shopping]
    params = [constrained(sampling, json=m.model_json_schema()) for m in models]
    conversations = [ask(f"Give me an example {m.__name__} as JSON.") for m in models]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    for model, out in zip(models, completions(outputs)):
        assert out.finish_reason == "stop", out.text
        model.model_validate_json(out.text)  # raises unless the text is JSON that the schema accepts


@pytest.mark.parametrize("sampling", SAMPLING)
def test_json_object(llm, sampling):
    conversations = [ask("Give me a JSON object with a name and an age."),
                     ask("What is the capital of France? Answer in JSON.")]
    for out in completions(llm.chat(conversations, constrained(sampling, json_object=True), use_tqdm=False)):
        assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), out.text


@pytest.mark.parametrize("sampling", SAMPLING)
def test_regex(llm, sampling):
    patterns = [r"\(\d{3}\) \d{3}-\d{4}", r"[A-Z][a-z]{1,10} (is|was) [a-z]{1,12}\."]
    prompts = ["Call me at", "The capital of France is"]
    free = llm.generate(prompts, greedy(16), use_tqdm=False)
    assert not any(re.fullmatch(p, o.text) for p, o in zip(patterns, completions(free)))  # the grammar does it
    outputs = llm.generate(prompts, [constrained(sampling, regex=p) for p in patterns], use_tqdm=False)
    for pattern, out in zip(patterns, completions(outputs)):
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), (pattern, out.text)


@pytest.mark.parametrize("sampling", SAMPLING)
def test_choice_and_ebnf_grammar(llm, sampling):
    choices = ["London", "Berlin", 'the "Big" Apple']
    prompts = ["The capital of France is", "Sum: 12 + 30 ="]
    free = completions(llm.generate(prompts[:1], greedy(8), use_tqdm=False))[0]
    assert free.text not in choices
    sum_grammar = 'root ::= "(" [0-9]+ " + " [0-9]+ ")"'
    params = [constrained(sampling, choice=choices), constrained(sampling, grammar=sum_grammar)]
    chosen, summed = completions(llm.generate(prompts, params, use_tqdm=False))
    assert chosen.finish_reason == "stop" and chosen.text in choices
    assert summed.finish_reason == "stop" and re.fullmatch(r"\(\d+ \+ \d+\)", summed.text), summed.text


def test_n_sequences_each_follow_the_grammar(llm):
    params = constrained("temperature 1", n=4, json=Pet.model_json_schema())
    outs = llm.chat(ask("A pet as JSON, please."), params, use_tqdm=False)[0].outputs
    assert len(outs) == 4
    for out in outs:
        assert out.finish_reason == "stop"
        Pet.model_validate_json(out.text)


def mixed_batch() -> tuple[list[str], list[SamplingParams]]:
    """Unconstrained greedy requests (even rows) between constrained ones (odd rows)."""
    kinds = [{"json": Pet.model_json_schema(), "disable_any_whitespace": True}, {"regex": r"[a-z]{2,8}"},
             {"choice": ["yes", "no"]}]
    prompts, params = [], []
    for i, kind in enumerate(kinds):
        prompts += [PROMPTS[i], PROMPTS[i + 3]]
        params += [greedy(32), constrained("temperature 1", **kind)]
    return prompts, params


def test_unconstrained_requests_keep_their_tokens(llm):
    prompts, params = mixed_batch()
    mixed = llm.generate(prompts, params, use_tqdm=False)
    alone = llm.generate(prompts[::2], params[::2], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[::2]] == [o.outputs[0].token_ids for o in alone]
    assert all(o.outputs[0].finish_reason == "stop" for o in mixed[1::2])


def test_async_scheduling_waits_for_grammars(llm):
    """Forced on the CPU: no decode step is launched before the tokens a grammar must accept are read, and the
    outputs equal the synchronous engine's."""
    pipelined = LLM(dtype="float32", async_scheduling=True)
    only_grammars = [constrained("greedy", json=Pet.model_json_schema()),
                     constrained("greedy", regex=r"[a-z ]{30}")]
    pipelined.generate(PROMPTS[:2], only_grammars, use_tqdm=False)
    assert pipelined.engine.stats["async_steps"] == 0
    prompts, params = mixed_batch()
    ours, theirs = (engine.generate(prompts, params, use_tqdm=False) for engine in (pipelined, llm))
    assert [c.token_ids for c in completions(ours)] == [c.token_ids for c in completions(theirs)]
    assert pipelined.engine.stats["async_steps"] > 0  # once the grammars finished
    assert pipelined.engine.kv.num_used_blocks == 0


def test_same_schema_compiles_once(llm):
    engine = llm.engine
    schema = {"type": "object", "properties": {"compiled_once": {"type": "boolean"}},
              "required": ["compiled_once"]}
    before = engine.grammar_compiler.cache_size_bytes
    engine.compile_structured_outputs(constrained("greedy", json=schema))
    size = engine.grammar_compiler.cache_size_bytes
    assert size > before
    again = constrained("greedy", max_tokens=30, json=dict(schema))  # an equal schema, another object
    engine.compile_structured_outputs(again)
    out = llm.generate("Done?", again, use_tqdm=False)[0].outputs[0]
    assert json.loads(out.text) in ({"compiled_once": True}, {"compiled_once": False})
    assert engine.grammar_compiler.cache_size_bytes == size
    engine.compile_structured_outputs(constrained("greedy", regex=r"compiled (once|twice)"))
    assert engine.grammar_compiler.cache_size_bytes > size
    assert engine.compile_structured_outputs(greedy(4)) is None


@pytest.mark.parametrize("kind, message", [
    ({"json": {"type": "nonsense"}}, "structured_outputs.json does not compile"),
    ({"json": "{not json"}, "structured_outputs.json does not compile"),
    ({"regex": "a(b"}, "structured_outputs.regex does not compile"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar does not compile"),
])
def test_grammars_that_do_not_compile_queue_nothing(llm, kind, message):
    bad = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(**kind))
    with pytest.raises(ValueError, match=message):
        llm.engine.compile_structured_outputs(bad)
    with pytest.raises(ValueError, match=message):
        llm.generate(["fine", "not fine"], [greedy(4), bad], use_tqdm=False)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", "not fine", bad)
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_used_blocks == 0
    assert llm.generate("Still serving?", greedy(3), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs", [
    {}, {"json": {}, "regex": "a"}, {"choice": ["a"], "json_object": True}, {"json_object": False},
    {"choice": []}, {"choice": "ab"}, {"regex": 5}, {"regex": "a\x00"}, {"json": 3},
])
def test_bad_structured_outputs_params(kwargs):
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**kwargs)


def test_structured_outputs_must_be_its_params_class():
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


def test_structured_outputs_need_a_tokenizer():
    bare = LLM(dtype="float32", skip_tokenizer_init=True, max_model_len=256)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    with pytest.raises(ValueError, match="structured_outputs need a tokenizer"):
        bare.generate([[1, 2, 3]], params, use_tqdm=False)
    with pytest.raises(ValueError, match="bad_words need a tokenizer"):
        bare.generate([[1, 2, 3]], SamplingParams(bad_words=["a"]), use_tqdm=False)
    assert not bare.engine.has_unfinished_requests()
