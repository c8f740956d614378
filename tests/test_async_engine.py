"""AsyncEngine, the server's seam to the engine, in both of its forms (the engine in a process of its own, or in a thread
of this one): what its streams yield, built from the engine's deltas, equals what LLM.generate returns."""
import asyncio

import pytest

from llmserve import SamplingParams
from llmserve.async_engine import AsyncEngine
from llmserve.config import EngineConfig
from llmserve.structured_outputs import StructuredOutputsParams

PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=2),
    SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=10),
    SamplingParams(temperature=0, max_tokens=40, stop=[" the", "."]),  # a stop string cuts text already streamed
    SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(regex=r"(yes|no), [a-z]+")),
]
PROMPTS = ["The capital of France is", "Once upon a time"]


@pytest.fixture(scope="module", params=[False, True], ids=["engine-process", "engine-thread"])
def engine(request):
    engine = AsyncEngine(EngineConfig(dtype="float32", kv_cache_memory_bytes=64 << 20), in_process=request.param)
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, request_id: str, params: SamplingParams) -> tuple[list, int]:
    token_ids = [engine.tokenize(p) for p in PROMPTS]
    stream = await engine.add_requests(request_id, PROMPTS, params, token_ids)
    final, steps = {}, 0
    async for index, output in stream:
        steps += 1
        final[index] = output
    return [final[i] for i in range(len(PROMPTS))], steps


@pytest.mark.parametrize("case", range(len(PARAMS)))
def test_streams_equal_llm_generate(engine, llm, case):
    params = PARAMS[case]
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    outputs, steps = asyncio.run(collect(engine, f"r{case}", params))
    assert steps > len(PROMPTS)  # outputs came step by step, not only at the end
    for got, want in zip(outputs, expected):
        assert got.prompt_token_ids == want.prompt_token_ids and got.finished
        if params.prompt_logprobs:
            assert [p and sorted(p) for p in got.prompt_logprobs] == [p and sorted(p) for p in want.prompt_logprobs]
        for g, w in zip(got.outputs, want.outputs, strict=True):
            assert (g.text, g.token_ids, g.finish_reason, g.stop_reason) == (w.text, w.token_ids, w.finish_reason,
                                                                               w.stop_reason)
            if params.logprobs:
                assert [sorted(p) for p in g.logprobs] == [sorted(p) for p in w.logprobs]
                assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-4)


def test_a_refused_call_queues_nothing_and_the_engine_goes_on(engine):
    async def run():
        good, too_long = engine.tokenize("Hi"), [1] * 5000
        with pytest.raises(ValueError, match="max_model_len") as error:
            await engine.add_requests("bad", ["Hi", "long"], SamplingParams(max_tokens=2), [good, too_long])
        assert error.value.field == "prompt"  # the field survives the trip from the engine process
        with pytest.raises(ValueError, match="structured_outputs"):
            await engine.add_requests("bad-grammar", ["Hi"], SamplingParams(
                max_tokens=2, structured_outputs=StructuredOutputsParams(regex="(unclosed")), [good])
        outputs, _ = await collect(engine, "after", SamplingParams(temperature=0, max_tokens=3))
        return outputs

    assert all(len(o.outputs[0].token_ids) == 3 for o in asyncio.run(run()))
    for _ in range(50):  # the engine's counters arrive with its next message
        if engine.state().running == 0 and engine.state().kv_cache_used_blocks == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert engine.state().kv_cache_used_blocks == 0 and engine.state().running == 0


def test_an_abandoned_stream_frees_its_blocks(engine):
    async def run():
        token_ids = [engine.tokenize(PROMPTS[0])]
        stream = await engine.add_requests("gone", PROMPTS[:1], SamplingParams(max_tokens=500, ignore_eos=True),
                                           token_ids)
        async for _, output in stream:
            if len(output.outputs[0].token_ids) >= 3:
                break
        stream.abort()
        await asyncio.sleep(0.5)

    asyncio.run(run())
    assert engine.state().running == 0 and engine.state().kv_cache_used_blocks == 0
