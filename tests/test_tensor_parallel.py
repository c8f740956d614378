"""Tensor parallelism on the CPU over gloo: every rank a process holding its slice of each layer. TP=2, 3 and 4 give
TP=1's greedy tokens and logprobs (the embedded model, random Llama, Qwen3, OPT and GPT-2 checkpoints, KV heads
split or replicated); sizes that do not divide the model are refused before any process starts; a rank that dies
is named and nothing hangs."""
import os
import re
import signal
import sys

import pytest

from llmserve import LLM, SamplingParams
from llmserve.plugins.conformance import model_configs, save_random_checkpoint

PROMPTS = [[5, 17, 300, 4000, 12], list(range(200, 290)), [42] * 7, list(range(1000, 1033))]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=2)


def run(model: str | None, **engine_args):
    llm = LLM(model=model, dtype="float32", skip_tokenizer_init=model is not None, max_num_batched_tokens=64,
              kv_cache_memory_bytes=64 << 20, **engine_args)
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    llm.engine.shutdown()
    # with P stages, up to P microbatches of the requests are in flight at once (one per stage)
    stages = engine_args.get("pipeline_parallel_size", 1)
    assert llm.engine.stats["max_microbatches_in_flight"] in ((0,) if stages == 1 else range(2, stages + 1))
    return outputs


def assert_same(ours, reference) -> None:
    for mine, theirs in zip(ours, reference):
        assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b, token in zip(mine.outputs[0].logprobs, theirs.outputs[0].logprobs, mine.outputs[0].token_ids):
            assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-3)
        for a, b in zip(mine.prompt_logprobs[1:], theirs.prompt_logprobs[1:]):
            assert {t: p.logprob for t, p in a.items()} == pytest.approx({t: p.logprob for t, p in b.items()},
                                                                         abs=1e-3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel"):
        config = model_configs()[architecture]
        config.architectures = [architecture]
        folders[architecture] = str(tmp_path_factory.mktemp(architecture))
        save_random_checkpoint(config, folders[architecture], layer_norms_near_one=True)
    return folders


def test_embedded_model_at_tp3_equals_tp1():
    """9 query and 3 KV heads over 3 ranks; its 49,152-token vocabulary over 3 embedding and LM-head slices."""
    assert_same(run(None, tensor_parallel_size=3), run(None))


@pytest.mark.parametrize("architecture, size", [("LlamaForCausalLM", 2), ("Qwen3ForCausalLM", 2),
                                                ("OPTForCausalLM", 2), ("GPT2LMHeadModel", 4),
                                                ("LlamaForCausalLM", 4)])
def test_random_checkpoints_equal_tp1(checkpoints, architecture, size):
    """Llama at 4 ranks has 2 KV heads for 4: each rank keeps the one its query heads use."""
    folder = checkpoints[architecture]
    assert_same(run(folder, tensor_parallel_size=size), run(folder))


@pytest.mark.parametrize("architecture, tp_size, pp_size", [("LlamaForCausalLM", 1, 2), ("GPT2LMHeadModel", 1, 3),
                                                              ("OPTForCausalLM", 1, 2), ("Qwen3ForCausalLM", 2, 2)])
def test_pipeline_stages_equal_tp1(checkpoints, architecture, tp_size, pp_size):
    """Layers split into stages (GPT-2's 4 over 3: 2, 1, 1), hidden states (and the residual) sent stage to stage,
    the last stage's logits sent to rank 0; with tensor parallelism inside each stage too."""
    folder = checkpoints[architecture]
    assert_same(run(folder, tensor_parallel_size=tp_size, pipeline_parallel_size=pp_size), run(folder))


def test_a_stage_holds_only_its_layers(checkpoints):
    """Rank 0, the first of two stages of an untied Llama: the embedding and layers 0-1, no LM head, no layers 2-3."""
    from llmserve.models.layers import MissingLayer

    llm = LLM(model=checkpoints["LlamaForCausalLM"], dtype="float32", skip_tokenizer_init=True,
              kv_cache_memory_bytes=64 << 20, pipeline_parallel_size=2)
    model = llm.engine.runner.model
    assert [isinstance(layer, MissingLayer) for layer in model.model.layers] == [False, False, True, True]
    assert isinstance(model.lm_head, MissingLayer) and not isinstance(model.model.embed_tokens, MissingLayer)
    assert len(llm.engine.runner.layers()) == 2  # KV cache for its own two layers
    llm.engine.shutdown()


def test_async_scheduling_across_ranks_equals_tp1(checkpoints):
    """A continuation step's tokens are rank 0's samples, still on its device: one broadcast gives the other ranks
    theirs (on GPUs async scheduling is on by default; here it is asked for)."""
    folder = checkpoints["LlamaForCausalLM"]
    llm = LLM(model=folder, dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=64 << 20,
              tensor_parallel_size=2, async_scheduling=True)
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert llm.engine.stats["async_steps"] > 0
    llm.engine.shutdown()
    assert_same(outputs, run(folder))


def test_embedded_model_in_two_stages_equals_one():
    assert_same(run(None, pipeline_parallel_size=2), run(None))


def test_seeded_sampling_with_penalties_and_a_grammar_across_ranks():
    """Rank 0 samples from the gathered (TP) or received (PP) logits exactly as one rank does: seeded top-p with a
    presence penalty, and a choice grammar."""
    from llmserve import StructuredOutputsParams

    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=5, structured_outputs=StructuredOutputsParams(
                  choice=["yes", "no"]))]
    prompts = ["Once upon a time", "Is the sky blue? Answer:"]

    def texts(**engine_args):
        llm = LLM(dtype="float32", kv_cache_memory_bytes=64 << 20, **engine_args)
        outputs = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.engine.shutdown()
        return outputs

    one = texts()
    assert one[1] in ("yes", "no")
    assert texts(tensor_parallel_size=3) == one and texts(pipeline_parallel_size=2) == one


def test_sizes_that_do_not_divide_the_model_are_refused(checkpoints):
    with pytest.raises(ValueError, match="pipeline_parallel_size 5 is larger than the model's 4 layers"):
        LLM(model=checkpoints["LlamaForCausalLM"], skip_tokenizer_init=True, pipeline_parallel_size=5)
    with pytest.raises(ValueError, match=r"^tensor_parallel_size 2 does not divide the model's attention heads \(9\)"):
        LLM(dtype="float32", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's attention heads"):
        LLM(model=checkpoints["LlamaForCausalLM"], skip_tokenizer_init=True, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        LLM(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="unknown distributed_executor_backend 'slurm'; registered: mp, ray"):
        LLM(tensor_parallel_size=3, distributed_executor_backend="slurm")


def test_a_rank_that_dies_is_named_and_nothing_hangs(checkpoints):
    llm = LLM(model=checkpoints["LlamaForCausalLM"], dtype="float32", skip_tokenizer_init=True,
              kv_cache_memory_bytes=64 << 20, tensor_parallel_size=2)
    workers = llm.engine.runner.workers
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2
    os.kill(workers.processes[0].pid, signal.SIGKILL)
    workers.processes[0].wait(timeout=30)
    with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 \(pid \d+\) exited with code -9"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.engine.shutdown()


def test_server_at_tp3_answers_and_exits_non_zero_when_a_rank_dies():
    """`llm serve -tp 3`: the official client gets TP=1's greedy text; when a rank is killed, /health turns 503
    without any request, the engine stops and the server exits 1 (for a supervisor to restart it)."""
    from pathlib import Path

    import openai
    from server_utils import ServerProcess

    expected = LLM(dtype="float32").generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8),
                                             use_tqdm=False)[0].outputs[0].text
    server = ServerProcess("-tp", "3")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert reply.choices[0].text == expected
        children = server.children(server.engine_process())  # the ranks, started by the engine's process
        assert len(children) == 2, server.output()
        os.kill(children[0], signal.SIGKILL)
        statuses = server.health_until_exit(30)
        assert server.process.wait(timeout=30) == 1, server.output()
        assert 503 in statuses and re.search("tensor-parallel rank [12] .* exited with code -9", server.output())
        for pid in children:  # the other rank went with it
            assert not os.path.exists(f"/proc/{pid}") or " Z " in Path(f"/proc/{pid}/stat").read_text()
    finally:
        server.stop()


@pytest.mark.slow
def test_ray_cluster_of_two_nodes_serves_tp3():
    """A local Ray cluster of two nodes (`ray start --head` and a second `ray start --address`, one CPU each): TP=3
    puts its two workers on different nodes (STRICT_SPREAD) and gives TP=1's tokens. Needs `pip install ray`."""
    import subprocess
    import tempfile

    pytest.importorskip("ray")
    from server_utils import free_port

    port = free_port()
    address = f"127.0.0.1:{port}"
    # a short folder: Ray's socket paths inside it must fit a Unix socket's 107 bytes
    common = ["--num-cpus", "1", "--disable-usage-stats", "--temp-dir", tempfile.mkdtemp(prefix="ray", dir="/tmp")]
    subprocess.run(["ray", "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                   check=True, capture_output=True)
    try:
        subprocess.run(["ray", "start", "--address", address, *common[:3]], check=True, capture_output=True)
        code = f"""
import os, ray
from llmserve import LLM, SamplingParams
prompts, params = {PROMPTS!r}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
llm = LLM(dtype="float32", tensor_parallel_size=3, distributed_executor_backend="ray", kv_cache_memory_bytes=64 << 20)
nodes = set(ray.util.placement_group_table(llm.engine.runner.workers.group)["bundles_to_node_id"].values())
tp3 = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
llm.engine.shutdown()
tp1 = [o.outputs[0].token_ids for o in LLM(dtype="float32").generate(prompts, params, use_tqdm=False)]
print(len(nodes), tp3 == tp1)
"""
        env = os.environ | {"RAY_ADDRESS": address, "LLMSERVE_RAY_PLACEMENT": "STRICT_SPREAD"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert done.stdout.split()[-2:] == ["2", "True"], done.stdout + done.stderr[-3000:]
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
