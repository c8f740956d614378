"""llmserve against vLLM on the same GPU, in one lease: the offline workloads and serving under load, with ratios.

    python benchmarks/vs_vllm.py --vllm-python /tmp/vllm/bin/python --out results.json
    PYTHONPATH=/tmp/vsite python benchmarks/vs_vllm.py --vllm-python python3   # vLLM importable from a --target dir

Offline (each engine in its own process, dummy bf16 weights, random token ids, greedy, EOS ignored, the same
workload for both from llmserve's `random_workload`):
  nano      Qwen3-0.6B shape, 256 requests, 100..1024 in / 100..1024 out: output tok/s
  llama8b   Llama-3.1-8B shape, 1000 x 1024 in / 128 out: requests/s
  latency   Llama-3.1-8B, batch 1, 32 in / 128 out: time per output token, and the 1-output-token run (prefill)
llmserve runs `llm bench throughput/latency` (max_num_seqs 256, 8192 tokens per step); vLLM runs this file as a child
twice for the throughput cases: with the limits it chooses itself and with ours.

Serving: `llm serve` and `vllm serve` (loopback, a free port, one after the other) on the Qwen3-0.6B shape with the
embedded model's tokenizer (both servers return text), both limited to 256 sequences and 8192 tokens per step, loaded
by `llm bench serve --clients 4` (512-token prompts, 256 output tokens) at concurrency 1, 16 and 256 and at Poisson
rates below and at saturation: output tok/s, TTFT, TPOT and ITL (p50, p99), and the busiest client's CPU share (near
1.0 the load generator could be the limit).

vLLM is skipped, with a message, where --vllm-python cannot import it. --scale shrinks every request count and the
--*-model options swap the models (a CPU smoke run: --scale 0.02 --dtype float32 with small models).
A short table is printed last; --out gets every figure as JSON. Where one run must be split (a machine's time limit per
command), --engines and --cases pick a part and --merge prints the table of several parts' JSON files.
--py-spy DIR records `llm serve` under the loads with py-spy (threads holding the GIL), to show where its time goes.
"""
import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIMITS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192}
SERVE_LOADS = "c1,c16,c256,r8,r32"  # c: a fixed concurrency; r: Poisson arrivals per second (up to 256 at once)


def parse_loads(text: str) -> list[tuple[str, float]]:
    kinds = {"c": "concurrency", "r": "rate"}
    return [(kinds[item[0]], float(item[1:])) for item in text.split(",")]


def offline_cases(args) -> dict:
    count = lambda n: max(1, round(n * args.scale))
    return {
        "nano": dict(model=args.small_model, kind="throughput", num_prompts=count(256), input_len="100:1024",
                     output_len="100:1024", figure="output_tokens_per_s", unit="out tok/s"),
        "llama8b": dict(model=args.large_model, kind="throughput", num_prompts=count(1000), input_len="1024",
                        output_len="128", figure="requests_per_s", unit="req/s"),
        "latency": dict(model=args.large_model, kind="latency", num_prompts=1, input_len="32", output_len="128",
                        figure="time_per_output_token_ms", unit="ms per output token"),
    }


# ---- the vLLM child: runs in vLLM's environment, imports nothing of llmserve ----------------------------------

def vllm_child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["model"], load_format="dummy", skip_tokenizer_init=True, dtype=spec["dtype"], seed=0)
    kwargs |= spec["limits"] | ({"enable_prefix_caching": False} if spec["kind"] == "latency" else {})
    llm = LLM(**kwargs)
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)

    def run(prompts, output_lens) -> float:
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], [params(n) for n in output_lens],
                               use_tqdm=False)
        wall = time.perf_counter() - start
        assert [len(o.outputs[0].token_ids) for o in outputs] == list(output_lens)
        return wall

    prompts, output_lens = spec["prompts"], spec["output_lens"]
    run([[1] * 16] * 2, [4, 4])  # warm-up
    result = {"engine": "vLLM " + __import__("vllm").__version__, "llm_kwargs": kwargs}
    if spec["kind"] == "throughput":
        wall = run(prompts, output_lens)
        return result | {"elapsed_s": wall, "requests_per_s": len(prompts) / wall,
                         "output_tokens_per_s": sum(output_lens) / wall}
    full = sorted(run(prompts, output_lens) for _ in range(3))[1]
    prefill = sorted(run(prompts, [1] * len(prompts)) for _ in range(3))[1]
    return result | {"latency_s": full, "prefill_s": prefill,
                     "time_per_output_token_ms": (full - prefill) / (output_lens[0] - 1) * 1000}


# ---- the parent: llmserve's CLI, vLLM children, servers -----------------------------------------------------

def run_json(command: list[str], out: Path, env: dict | None = None, timeout: float = 1800) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode or not out.exists():
        return {"error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(out.read_text())


def llmserve_offline(case: dict, dtype: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    command = [sys.executable, "-m", "llmserve.cli", "bench", case["kind"], "--model", case["model"], "--load-format",
               "dummy", "--skip-tokenizer-init", "--dtype", dtype, "--max-num-seqs", str(LIMITS["max_num_seqs"]),
               "--max-num-batched-tokens", str(LIMITS["max_num_batched_tokens"]), "--log-level", "warning",
               "--output-json", str(out)]
    if case["kind"] == "throughput":
        command += ["--num-prompts", str(case["num_prompts"]), "--input-len", case["input_len"], "--output-len",
                    case["output_len"]]
    else:
        command += ["--batch-size", "1", "--input-len", case["input_len"], "--output-len", case["output_len"]]
    return run_json(command, out)


def vllm_offline(case: dict, dtype: str, vllm_python: str, matched: bool) -> dict:
    from llmserve.cli.bench_offline import random_workload

    vocab = json.loads((Path(case["model"]) / "config.json").read_text())["vocab_size"]
    workload = random_workload(vocab, case["num_prompts"], case["input_len"], case["output_len"], 0)
    folder = Path(tempfile.mkdtemp())
    spec = {"model": case["model"], "kind": case["kind"], "dtype": dtype, "limits": LIMITS if matched else {},
            "prompts": workload.prompts, "output_lens": workload.output_lens}
    (folder / "spec.json").write_text(json.dumps(spec))
    return run_json([vllm_python, __file__, "--child", str(folder / "spec.json"), "--child-out",
                     str(folder / "result.json")], folder / "result.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_folder(shape: str, tokenizer_from: str | None) -> str:
    """`shape`'s config (vocabulary set to the tokenizer's) beside a tokenizer (default: the embedded model's)."""
    from llmserve.loader import find_model

    tokenizer_dir, folder = Path(tokenizer_from or find_model(None)), Path(tempfile.mkdtemp())
    config = json.loads((Path(shape) / "config.json").read_text())
    config["vocab_size"] = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return str(folder)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children so far (vLLM's engine core is a child of its server)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0.0


def serve_and_load(command: list[str], port: int, loads: list, scale: float, vocab: int,
                   py_spy: Path | None = None) -> dict:
    from llmserve.cli.bench import wait_for_server

    if py_spy:  # py-spy starts the server, so it may trace it without extra privileges; SIGINT makes it write
        py_spy.mkdir(parents=True, exist_ok=True)
        command = ["py-spy", "record", "--gil", "--threads", "--subprocesses", "--nonblocking", "--rate", "200",
                   "--format", "speedscope", "-o", str(py_spy / "llm-serve.speedscope.json"), "--", *command]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True)
    results = {}
    try:
        wait_for_server(f"http://127.0.0.1:{port}/v1/models", 900, server)
        for kind, value in loads:
            concurrency = int(value) if kind == "concurrency" else 256
            prompts = max(2, round(max(64, 4 * concurrency) * scale)) if kind == "concurrency" else \
                max(2, round(256 * scale))
            out = Path(tempfile.mkdtemp()) / "serve.json"
            load = ["--concurrency", str(concurrency)] + (["--request-rate", str(value)] if kind == "rate" else [])
            cpu_before, wall_before = cpu_seconds(server.pid), time.perf_counter()
            key = f"{kind} {value:g}"
            key += f" (again {sum(k.startswith(key) for k in results)})" if key in results else ""
            result = results[key] = run_json(
                [sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}/v1",
                 "--num-prompts", str(prompts), "--input-len", "512", "--output-len", "256", "--vocab-size",
                 str(vocab), "--clients", "4", "--result-file", str(out), *load], out)
            result["server_cpu"] = (cpu_seconds(server.pid) - cpu_before) / (time.perf_counter() - wall_before)
    except (RuntimeError, TimeoutError) as e:
        results["error"] = f"{e}: {Path(log.name).read_text()[-3000:]}"
    finally:
        server.send_signal(signal.SIGINT if py_spy else signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    return results


def py_spy_summary(path: Path, top: int = 25) -> str:
    """Per thread: seconds sampled holding the GIL, and the functions where they went (self and inclusive)."""
    from collections import Counter

    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    name = lambda i: f"{frames[i]['name']} ({Path(frames[i].get('file') or '?').name}:{frames[i].get('line')})"
    lines = []
    for profile in data["profiles"]:
        own, inclusive = Counter(), Counter()
        for stack, weight in zip(profile["samples"], profile["weights"]):
            if stack:
                own[stack[-1]] += weight
            for i in set(stack):
                inclusive[i] += weight
        total = sum(profile["weights"])
        lines.append(f"== {profile['name']}: {total:.1f} s holding the GIL")
        for title, counter in (("self", own), ("inclusive", inclusive)):
            lines.append(f"  -- {title}")
            lines += [f"  {w:8.2f} s {100 * w / total:5.1f}%  {name(i)}" for i, w in counter.most_common(top)]
    return "\n".join(lines)


def serving(args, vllm_python: str | None) -> dict:
    loads = parse_loads(args.serve_loads)
    folder = serving_folder(args.small_model, args.tokenizer_from)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    limits = ["--max-num-seqs", str(LIMITS["max_num_seqs"]), "--max-num-batched-tokens",
              str(LIMITS["max_num_batched_tokens"])]
    common = [folder, "--load-format", "dummy", "--dtype", args.dtype, *limits]
    port = free_port()
    results = {}
    if "llmserve" in args.engines:
        command = [sys.executable, "-m", "llmserve.cli", "serve", *common, "--port", str(port), "--log-level",
                   "warning", *args.llmserve_args.split()]
        results["llmserve"] = serve_and_load(command, port, loads, args.scale, vocab,
                                             Path(args.py_spy) if args.py_spy else None)
    if args.py_spy:
        recorded = Path(args.py_spy) / "llm-serve.speedscope.json"
        if recorded.exists():
            (recorded.parent / "summary.txt").write_text(py_spy_summary(recorded))
    if vllm_python:
        port = free_port()
        results["vllm"] = serve_and_load([vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                          *common, "--port", str(port)], port, loads, args.scale, vocab)
    return results


def vllm_available(vllm_python: str | None) -> str | None:
    if not vllm_python:
        return None
    done = subprocess.run([vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    if done.returncode:
        print(f"vLLM skipped: {vllm_python} cannot import vllm ({done.stderr.strip().splitlines()[-1:]})",
              file=sys.stderr)
        return None
    return vllm_python


def table(results: dict) -> list[tuple[str, ...]]:
    rows = [("workload", "llmserve", "vLLM (its limits)", "vLLM (ours)", "llmserve / best vLLM")]
    for name, r in results.get("offline", {}).items():
        key, unit = r["figure"], r["unit"]
        ours = r.get("llmserve", {}).get(key)
        peers = [r.get(v, {}).get(key) for v in ("vllm", "vllm_matched")]
        lower_is_better = key.endswith("_ms")
        known = [p for p in peers if p]
        best = (min(known) if lower_is_better else max(known)) if known else None
        ratio = (best / ours if lower_is_better else ours / best) if ours and best else None
        rows.append((f"{name} ({unit})", *(f"{v:.2f}" if v else "-" for v in [ours, *peers]),
                     f"{ratio:.2f}" if ratio else "-"))
        if name == "latency":
            prefill = [r.get(e, {}).get("prefill_s") for e in ("llmserve", "vllm")]
            rows.append(("  1-token run (ms)", *(f"{p * 1000:.1f}" if p else "-" for p in prefill), "-",
                         f"{prefill[1] / prefill[0]:.2f}" if all(prefill) else "-"))
    serving = results.get("serving", {})
    for load in dict.fromkeys([*serving.get("llmserve", {}), *serving.get("vllm", {})]):
        ours = serving.get("llmserve", {}).get(load, {})
        if not isinstance(ours, dict):
            continue
        peer = serving.get("vllm", {}).get(load, {})
        cell = lambda r: ("-" if "error" in r or not r else
                          f"{r['output_throughput']:.0f} tok/s, TTFT {r['p50_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f}, "
                          f"TPOT {r['p50_tpot_ms']:.1f}/{r['p99_tpot_ms']:.1f}, ITL {r['p50_itl_ms']:.1f}/"
                          f"{r['p99_itl_ms']:.1f}, client {r['client_cpu_max']:.2f}, server {r['server_cpu']:.2f}")
        ratio = (ours.get("output_throughput", 0) / peer["output_throughput"]) if peer.get("output_throughput") else None
        rows.append((f"serve {load}", cell(ours), "", cell(peer), f"{ratio:.2f}" if ratio else "-"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", default=sys.executable, help="a Python that imports vllm")
    parser.add_argument("--cases", default="nano,llama8b,latency,serve")
    parser.add_argument("--engines", default="llmserve,vllm")
    parser.add_argument("--serve-loads", default=SERVE_LOADS, help="c<concurrency> or r<requests/s>, comma-separated")
    parser.add_argument("--tokenizer-from", help="a folder with the tokenizer (and config.json) to serve with")
    parser.add_argument("--llmserve-args", default="", help="more options for llm serve (e.g. --engine-in-process)")
    parser.add_argument("--py-spy", metavar="DIR", help="record llm serve's threads under load with py-spy into DIR")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print the table of these results files")
    parser.add_argument("--small-model", default=str(HERE / "models" / "Qwen3-0.6B"))
    parser.add_argument("--large-model", default=str(HERE / "models" / "Llama-3.1-8B"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every request count (smoke runs)")
    parser.add_argument("--out", help="write every figure here as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(vllm_child(json.loads(Path(args.child).read_text()))))
        return
    if args.merge:
        print_table(merge(json.loads(Path(f).read_text()) for f in args.merge))
        return
    vllm_python = vllm_available(args.vllm_python) if "vllm" in args.engines else None
    wanted = args.cases.split(",")
    results = {"offline": {}}
    for name, case in offline_cases(args).items():
        if name not in wanted:
            continue
        r = results["offline"][name] = {"figure": case["figure"], "unit": case["unit"]}
        if "llmserve" in args.engines:
            r["llmserve"] = llmserve_offline(case, args.dtype)
        if vllm_python:
            r["vllm"] = vllm_offline(case, args.dtype, vllm_python, matched=False)
            if case["kind"] == "throughput":
                r["vllm_matched"] = vllm_offline(case, args.dtype, vllm_python, matched=True)
    if "serve" in wanted:
        results["serving"] = serving(args, vllm_python)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)


def merge(parts) -> dict:
    """Several runs' results as one (a later part's figures win)."""
    merged: dict = {}

    def into(target: dict, source: dict) -> None:
        for key, value in source.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                into(target[key], value)
            else:
                target[key] = value

    for part in parts:
        into(merged, part)
    return merged


def print_table(results: dict) -> None:
    rows = table(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows))


if __name__ == "__main__":
    main()
