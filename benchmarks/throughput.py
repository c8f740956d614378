"""Offline throughput of llmserve against its CPU peers: HF transformers and vLLM's CPU build.

One workload (shared/cpu-peer.md): 64 requests, random.seed(0), prompts of 16..512 random
token ids, 16..128 output tokens each, greedy, EOS ignored. Every engine runs in its own
subprocess (this same file, with --child), loads and warms up its model, times only the
generation, and prints one JSON line that the parent collects. Output tokens/s counts only
the tokens the requests asked for.

    python benchmarks/throughput.py                       # all engines, float32 and bfloat16
    python benchmarks/throughput.py --engines vllm hf --dtypes bfloat16 --json results.json
    python benchmarks/throughput.py --engines llmserve vllm --attention-backends TORCH_SDPA CPU_ATTN

vLLM runs from its own virtual environment (benchmarks/setup_vllm_cpu.sh creates it) and is
skipped when that environment is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("llmserve", "hf", "vllm")
DTYPES = ("float32", "bfloat16")
NUM_REQUESTS = 64
PROMPT_TOKENS, OUTPUT_TOKENS = 18_464, 4_902
RESULT_PREFIX = "THROUGHPUT_RESULT "
DEFAULT_VLLM_VENV = os.environ.get(
    "LLMSERVE_VLLM_VENV", str(Path.home() / ".cache" / "llmserve" / "vllm-cpu-venv"))
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}

Workload = list[tuple[list[int], int]]  # (prompt token ids, output tokens) per request


def make_workload() -> Workload:
    random.seed(0)
    prompt_lens = [random.randint(16, 512) for _ in range(NUM_REQUESTS)]
    output_lens = [random.randint(16, 128) for _ in range(NUM_REQUESTS)]
    prompts = [[random.randint(100, 40000) for _ in range(n)] for n in prompt_lens]
    workload = list(zip(prompts, output_lens))
    assert sum(prompt_lens) == PROMPT_TOKENS and sum(output_lens) == OUTPUT_TOKENS
    return workload


def check_lengths(workload: Workload, outputs: list[list[int]]) -> None:
    got = [len(o) for o in outputs]
    assert got == [k for _, k in workload], f"output lengths differ from the requested ones: {got}"


# ---- children: each loads one engine, warms it up and times the workload -------------------

def run_llmserve(workload: Workload, dtype: str, model: str, attention_backend: str | None) -> dict:
    from llmserve import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, attention_backend=attention_backend)  # the same HF folder the peers load
    llm.generate([workload[0][0]], [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)], use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for _, k in workload]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in workload], params, use_tqdm=False)
    wall = time.perf_counter() - start
    check_lengths(workload, [o.outputs[0].token_ids for o in outs])
    return {"wall_s": wall}


def hf_generate_batch(model, batch: Workload) -> None:
    """One static batch: left-padded prompts, every row generating the batch's largest request."""
    import torch

    width, new_tokens = max(len(p) for p, _ in batch), max(k for _, k in batch)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=0,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    assert out.shape == (len(batch), width + new_tokens), out.shape


def run_hf(workload: Workload, dtype: str, model: str, batch_sizes: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    hf.generation_config.eos_token_id = None  # EOS ignored
    walls = {}
    with torch.inference_mode():
        hf_generate_batch(hf, [(workload[0][0], 8), (workload[1][0], 8)])  # warm-up
        for bs in batch_sizes:
            start = time.perf_counter()
            for i in range(0, len(workload), bs):
                hf_generate_batch(hf, workload[i:i + bs])
            walls[bs] = time.perf_counter() - start
    best = min(walls, key=walls.get)
    return {"wall_s": walls[best], "batch_size": best,
            "tok_s_by_batch_size": {bs: OUTPUT_TOKENS / w for bs, w in walls.items()}}


def run_vllm(workload: Workload, dtype: str, model: str) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, seed=0)
    llm.generate([{"prompt_token_ids": workload[0][0]}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)
    prompts = [{"prompt_token_ids": p} for p, _ in workload]
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for _, k in workload]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    check_lengths(workload, [o.outputs[0].token_ids for o in outs])
    return {"wall_s": wall, "version": __import__("vllm").__version__}


def engine_label(engine: str, attention_backend: str | None) -> str:
    return f"{engine}/{attention_backend}" if attention_backend else engine


def child_main(args: argparse.Namespace) -> None:
    workload = make_workload()
    if args.child == "llmserve":
        result = run_llmserve(workload, args.dtype, args.model, args.attention_backend)
    elif args.child == "hf":
        result = run_hf(workload, args.dtype, args.model, args.hf_batch_sizes)
    else:
        result = run_vllm(workload, args.dtype, args.model)
    result.update(engine=engine_label(args.child, args.attention_backend), dtype=args.dtype, output_tok_s=OUTPUT_TOKENS / result["wall_s"])
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---- parent: one subprocess per (engine, dtype), then the table -----------------------------

def vllm_python(venv: str) -> str | None:
    python = Path(venv) / "bin" / "python"
    return str(python) if python.is_file() else None


def run_child(python: str, engine: str, dtype: str, model: str, args: argparse.Namespace,
              attention_backend: str | None = None) -> dict:
    cmd = [python, __file__, "--child", engine, "--dtype", dtype, "--model", model,
           "--hf-batch-sizes", *map(str, args.hf_batch_sizes)]
    if attention_backend:
        cmd += ["--attention-backend", attention_backend]
    env = {**os.environ, **(VLLM_ENV if engine == "vllm" else {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        return {"engine": engine_label(engine, attention_backend), "dtype": dtype, "error": f"exit code {proc.returncode}\n{tail}"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def describe(result: dict) -> str:
    if "error" in result:
        return f"{result['engine']:>19} {result['dtype']:<8} FAILED: {result['error']}"
    extra = ""
    if result["engine"] == "hf":
        by_bs = ", ".join(f"bs {bs}: {t:.1f}" for bs, t in result["tok_s_by_batch_size"].items())
        extra = f"  (best batch size {result['batch_size']}; {by_bs})"
    return f"{result['engine']:>19} {result['dtype']:<8} {result['output_tok_s']:8.1f} tok/s{extra}"


def print_table(results: list[dict]) -> None:
    ok = {(r["engine"], r["dtype"]): r["output_tok_s"] for r in results if "error" not in r}
    print(f"\n{'engine':<20}{'dtype':<10}{'out tok/s':>10}{'wall s':>9}{'x HF':>8}{'x vLLM':>8}")
    for r in results:
        if "error" in r:
            continue
        engine, dtype, tok_s = r["engine"], r["dtype"], r["output_tok_s"]
        hf, vllm = ok.get(("hf", dtype)), ok.get(("vllm", dtype))
        vs_hf = f"{tok_s / hf:.2f}" if hf else "-"
        vs_vllm = f"{tok_s / vllm:.2f}" if engine.startswith("llmserve") and vllm else "-"
        print(f"{engine:<20}{dtype:<10}{tok_s:>10.1f}{r['wall_s']:>9.1f}{vs_hf:>8}{vs_vllm:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[8, 16, 64],
                        help="static batch sizes HF transformers runs; the best counts (default: 8 16 64)")
    parser.add_argument("--vllm-venv", default=DEFAULT_VLLM_VENV,
                        help="vLLM CPU virtual environment (default: $LLMSERVE_VLLM_VENV or %(default)s)")
    parser.add_argument("--attention-backends", nargs="+", default=[None], metavar="BACKEND",
                        help="llmserve runs once with each of these attention backends (default: the platform's)")
    parser.add_argument("--json", help="write the full results to this file")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--attention-backend", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)

    make_workload()  # checks the totals before any engine starts
    from llmserve.loader import find_model

    model = find_model(None)
    pythons = {"llmserve": sys.executable, "hf": sys.executable, "vllm": vllm_python(args.vllm_venv)}
    print(f"workload: {NUM_REQUESTS} requests, {PROMPT_TOKENS} prompt / {OUTPUT_TOKENS} output tokens; model {model}")
    results = []
    for dtype in args.dtypes:
        for engine in args.engines:
            if pythons[engine] is None:
                print(f"{engine:>8} {dtype:<8} skipped: no vLLM environment at {args.vllm_venv} "
                      f"(run benchmarks/setup_vllm_cpu.sh)", flush=True)
                continue
            for backend in (args.attention_backends if engine == "llmserve" else [None]):
                results.append(run_child(pythons[engine], engine, dtype, model, args, backend))
                print(describe(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "cpu_count": os.cpu_count(), "results": results}, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
