"""GPU throughput: `llm bench throughput` with CUDA graphs on and off, and HF transformers' continuous batching
(`generate_batch`, paged sdpa) as the peer, on the same random workload, each in its own process.

    python benchmarks/gpu_throughput.py --model benchmarks/models/Qwen3-0.6B --num-prompts 256 \\
        --input-len 100:1024 --output-len 100:1024 --hf-num-prompts 64 --json results.json

Weights are random (`--load-format dummy`, bf16): throughput does not depend on them, and EOS is ignored.
HF's generate_batch takes one max_new_tokens for all requests: it gets the mean of the output lengths,
on its own number of requests (`--hf-num-prompts`, 0 to skip it), since it is far slower.
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_llmserve(args: argparse.Namespace, eager: bool) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    command = [sys.executable, "-m", "llmserve.cli", "bench", "throughput", "--model", args.model,
               "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", "bfloat16",
               "--num-prompts", str(args.num_prompts), "--input-len", args.input_len, "--output-len", args.output_len,
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--attention-backend", args.attention_backend, "--output-json", str(out), "--log-level", "warning"]
    start = time.perf_counter()
    subprocess.run(command + (["--enforce-eager"] if eager else []), check=True)
    result = json.loads(out.read_text())
    return {"engine": f"llmserve ({'eager' if eager else 'CUDA graphs'})", "process_s": time.perf_counter() - start,
            **result}


def hf_child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    rng = random.Random(0)
    low, _, high = args.input_len.partition(":")
    prompts = [[rng.randrange(1000, 30000) for _ in range(rng.randint(int(low), int(high or low)))]
               for _ in range(args.hf_num_prompts)]
    out_low, _, out_high = args.output_len.partition(":")
    new_tokens = (int(out_low) + int(out_high or out_low)) // 2
    config = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    model = model.to("cuda").eval()
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(prompts[:2], generation_config=generation)  # warm-up
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=generation)
    wall = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in outputs.values())
    print("RESULT " + json.dumps({"engine": "HF transformers (generate_batch)", "num_requests": len(prompts),
                                  "output_tokens": produced, "elapsed_s": wall,
                                  "requests_per_s": len(outputs) / wall, "output_tokens_per_s": produced / wall}))


def run_hf(args: argparse.Namespace) -> dict | None:
    done = subprocess.run([sys.executable, __file__, "--hf-child", *sys.argv[1:]], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(f"HF transformers failed:\n{done.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def workload_parser(description: str) -> argparse.ArgumentParser:
    """The workload and engine options of the GPU benchmark scripts (the nano-vllm workload by default)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/Qwen3-0.6B")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", default="100:1024")
    parser.add_argument("--output-len", default="100:1024")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--attention-backend", default="TRITON_ATTN")
    return parser


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--hf-num-prompts", type=int, default=64)
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument("--json", help="write the full results here")
    parser.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_child:
        return hf_child(args)
    # Triton compiles each kernel variant once into its disk cache; a short untimed run fills it, as a user's
    # first run would.
    run_llmserve(argparse.Namespace(**vars(args) | {"num_prompts": min(args.num_prompts, 32)}), eager=True)
    rows = [run_llmserve(args, eager=False)] + ([] if args.skip_eager else [run_llmserve(args, eager=True)])
    if args.hf_num_prompts:
        rows += [r for r in [run_hf(args)] if r]
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    print(f"\n{args.model}: {args.num_prompts} requests, input {args.input_len}, output {args.output_len} tokens, "
          "bf16 dummy weights, EOS ignored")
    print(f"{'engine':<36}{'requests':>9}{'out tok/s':>11}{'req/s':>8}{'elapsed s':>11}{'roofline':>10}")
    for r in rows:
        roofline = f"{r['roofline_fraction']:.2f}" if "roofline_fraction" in r else "-"
        print(f"{r['engine']:<36}{r['num_requests']:>9}{r['output_tokens_per_s']:>11.0f}{r['requests_per_s']:>8.2f}"
              f"{r['elapsed_s']:>11.1f}{roofline:>10}")


if __name__ == "__main__":
    main()
