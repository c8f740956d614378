"""Tensor parallelism on GPUs: the same engine at TP=1 and TP=2 (or --sizes), each in its own process.

    python benchmarks/tensor_parallel.py [--model benchmarks/models/Llama-3.1-8B] [--sizes 1,2] [--out results.json]
    python benchmarks/tensor_parallel.py --serve benchmarks/models/Llama-3.1-70B --sizes 2

Default: dummy bf16 weights with the model's config; `llm bench throughput` (1000 requests x 1024 in / 128 out) and
`llm bench latency` (batch 1, 32 in / 128 out: time per output token) at each size, with the ratio to TP=1.
--serve MODEL: `llm serve MODEL -tp N` on a free port and `llm bench serve` against it (output tok/s, TTFT, TPOT),
for a model that needs every GPU (Llama-3.1-70B's config is 140 GB in bf16). A short table is printed last.
"""
import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

LLM = [sys.executable, "-m", "llmserve.cli"]
COMMON = ["--load-format", "dummy", "--skip-tokenizer-init", "--dtype", "bfloat16", "--log-level", "warning"]


def bench(kind: str, model: str, size: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    command = [*LLM, "bench", kind, "--model", model, *COMMON, "-tp", str(size), *extra, "--output-json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-1500:]}
    return json.loads(out.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, size: int, num_prompts: int) -> dict:
    port, out = free_port(), Path(tempfile.mkdtemp()) / "serve.json"
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    server = subprocess.Popen([*LLM, "serve", model, *COMMON, "-tp", str(size), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        done = subprocess.run([*LLM, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}/v1", "--num-prompts",
                               str(num_prompts), "--input-len", "1024", "--output-len", "128",
                               "--vocab-size", str(vocab),
                               "--ready-timeout", "900", "--result-file", str(out)], capture_output=True, text=True)
        return json.loads(out.read_text()) if done.returncode == 0 else {"error": done.stderr[-1500:]}
    finally:
        server.terminate()
        server.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmarks/models/Llama-3.1-8B")
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--serve", metavar="MODEL", help="serve this model and load it with `llm bench serve`")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--cases", default="throughput,latency", help="which of throughput,latency to run")
    parser.add_argument("--out", help="write the full results as JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results, rows = {}, [("case", "TP", "figure", "ratio to the first size")]
    if args.serve:
        for size in sizes:
            r = results[f"serve tp{size}"] = serve(args.serve, size, min(args.num_prompts, 200))
            rows.append((f"serve {Path(args.serve).name}", str(size), "error" if "error" in r else
                         f"{r.get('output_throughput', 0):.0f} output tok/s, TTFT p50 {r.get('p50_ttft_ms', 0):.0f}"
                         f" ms, TPOT p50 {r.get('p50_tpot_ms', 0):.1f} ms", ""))
    else:
        first = {}
        for size in sizes:
            cases = []
            if "throughput" in args.cases:
                cases.append(("throughput", bench("throughput", args.model, size, [
                    "--num-prompts", str(args.num_prompts), "--input-len", "1024", "--output-len", "128"]),
                    "requests_per_s", "req/s"))
            if "latency" in args.cases:
                cases.append(("batch-1 time per output token", bench("latency", args.model, size,
                                                                     ["--batch-size", "1"]),
                              "time_per_output_token_ms", "ms"))
            for name, r, key, unit in cases:
                results[f"{name} tp{size}"] = r
                value = r.get(key)
                first.setdefault(name, value)
                rows.append((name, str(size), "error" if value is None else f"{value:.2f} {unit}",
                             f"{value / first[name]:.2f}" if value and first[name] else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows))


if __name__ == "__main__":
    main()
