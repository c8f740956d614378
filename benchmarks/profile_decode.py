"""Where a steady decode step's time goes on a GPU: wall time, GPU kernel time (torch.profiler), host Python (cProfile).

    python benchmarks/profile_decode.py --model benchmarks/models/Qwen3-0.6B --requests 256 --prompt-len 800
    python benchmarks/profile_decode.py --model benchmarks/models/Llama-3.1-8B --prefill --prompt-len 32

Fills the batch (random prompts, dummy bf16 weights), lets decode settle, then times 20 steps, profiles
10 on the GPU and 20 on the host. The difference between wall and GPU time is host work the GPU waits for.
With --prefill the measured "step" is instead one whole request of --prompt-len tokens and one output token
(the single-request prefill of `llm bench latency`), prefix caching off.
"""
import argparse
import cProfile
import pstats
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from llmserve.config import EngineConfig
from llmserve.engine import LLMEngine
from llmserve.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/Qwen3-0.6B")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=800)
    parser.add_argument("--attention-backend", default="TRITON_ATTN")
    parser.add_argument("--max-num-seqs", type=int, help="the engine's batch limit (default: --requests)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--prefill", action="store_true", help="profile one request's prefill instead")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                                    max_num_batched_tokens=8192, max_num_seqs=args.max_num_seqs or args.requests,
                                    attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                                    enable_prefix_caching=not args.prefill))
    rng = random.Random(0)
    if args.prefill:
        prompt = [rng.randrange(engine.vocab_size) for _ in range(args.prompt_len)]
        once = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
        counter = iter(range(10**9))

        def one_request() -> None:
            engine.add_request(f"p{next(counter)}", prompt, once, prompt)
            while engine.has_unfinished_requests():
                engine.step(finished_only=True)

        for _ in range(5):
            one_request()
        measure(one_request, f"one request, {args.prompt_len} prompt tokens, 1 output token")
        return
    for i in range(args.requests):
        prompt = [rng.randrange(engine.vocab_size) for _ in range(args.prompt_len)]
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=200, ignore_eos=True, temperature=0), prompt)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step(finished_only=True)
    for _ in range(5):
        engine.step(finished_only=True)
    measure(lambda: engine.step(finished_only=True),
            f"decode step, {args.requests} requests at ~{args.prompt_len + 30} tokens of context")


def measure(step, label: str) -> None:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / 20 * 1000
    with profile(activities=[ProfilerActivity.CUDA]) as gpu_profile:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    events = gpu_profile.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 10 / 1000
    host = cProfile.Profile()
    host.enable()
    for _ in range(20):
        step()
    host.disable()
    pstats.Stats(host).sort_stats("tottime").print_stats(15)
    pstats.Stats(host).sort_stats("cumulative").print_stats(30)
    print(events.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    print(f"{label}: wall {wall_ms:.2f} ms, GPU kernels {gpu_ms:.2f} ms, GPU idle {wall_ms - gpu_ms:.2f} ms")


if __name__ == "__main__":
    main()
