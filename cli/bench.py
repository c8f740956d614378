"""`llm bench serve`: load a running OpenAI-compatible server and report throughput and latencies."""
import asyncio
import json
import random
import subprocess
import time
from dataclasses import dataclass, field
from typing import Annotated, Optional

import numpy as np
import typer

from llmserve.cli.main import bench_app


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    sent_at: float = 0.0  # wall clock


def load_prompts(dataset: str | None, num_prompts: int, input_len: int, vocab_size: int, rng: random.Random) -> list:
    """Prompts from a file, else random token ids."""
    if dataset is None:
        return [[rng.randrange(100, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]
    return read_prompt_file(dataset, num_prompts)


def read_prompt_file(path: str, num_prompts: int) -> list[str]:
    """num_prompts prompts from a file of one per line, or JSON lines with a "prompt" field (repeated as needed)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    prompts = [json.loads(line)["prompt"] if line.lstrip().startswith("{") else line for line in lines]
    if not prompts:
        raise typer.BadParameter(f"{path} holds no prompts", param_hint="--dataset")
    return [prompts[i % len(prompts)] for i in range(num_prompts)]


def wait_for_server(url: str, timeout: float, process: subprocess.Popen | None = None,
                    headers: dict | None = None, verify: bool | str = True) -> None:
    """Poll GET `url` until it answers 200; fail when `timeout` passes or the server `process` exits. `verify`: an
    https server's CA bundle (httpx's verify)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url, headers=headers, timeout=2, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.3)


async def send(client, model: str, prompt, output_len: int, structured_outputs: dict | None = None) -> RequestResult:
    result, start = RequestResult(sent_at=time.time()), time.perf_counter()
    last = start
    extra = {"ignore_eos": True} | ({"structured_outputs": structured_outputs} if structured_outputs else {})
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=output_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage:
                result.output_tokens, result.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            if chunk.choices:  # the server sends a choice chunk when tokens arrive, with or without text
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency, result.ok = time.perf_counter() - start, True
    except Exception as e:  # a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(base_url: str, api_key: str, model: str | None, prompts: list, output_len: int,
                   concurrency: int | None, request_rate: float, seed: int,
                   structured_outputs: dict | None = None, start_at: float = 0.0) -> tuple[str, list[RequestResult]]:
    """Send the prompts (from `start_at`, wall clock, once the client is ready: imported, the model looked up)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=3600)
    model = model or (await client.models.list()).data[0].id
    await asyncio.sleep(max(0.0, start_at - time.time()))
    limit = asyncio.Semaphore(concurrency or len(prompts))
    gaps = np.random.default_rng(seed).exponential(1 / request_rate, len(prompts)) if request_rate != float("inf") \
        else np.zeros(len(prompts))

    async def limited(prompt) -> RequestResult:
        async with limit:
            return await send(client, model, prompt, output_len, structured_outputs)

    tasks = []
    for prompt, gap in zip(prompts, gaps):
        tasks.append(asyncio.create_task(limited(prompt)))
        await asyncio.sleep(gap)
    results = await asyncio.gather(*tasks)
    await client.close()
    return model, results


@dataclass
class ClientShare:
    """One load-generating process's part of the load, and (after) what it measured."""

    base_url: str
    api_key: str
    model: str | None
    prompts: list
    output_len: int
    concurrency: int | None
    request_rate: float
    seed: int
    structured_outputs: dict | None
    start_at: float  # wall clock: every client starts then, its imports done


def run_share(share: ClientShare) -> tuple[str, list[RequestResult], float]:
    """(model, results, CPU seconds) of one client's share: the CPU time says whether the client itself could have
    been the limit (near one core's worth of the duration, it was)."""
    cpu = time.process_time()
    model, results = asyncio.run(run_load(share.base_url, share.api_key, share.model, share.prompts,
                                          share.output_len, share.concurrency, share.request_rate, share.seed,
                                          share.structured_outputs, share.start_at))
    return model, results, time.process_time() - cpu


def run_clients(clients: int, base_url: str, api_key: str, model: str | None, prompts: list, output_len: int,
                concurrency: int | None, request_rate: float, seed: int,
                structured_outputs: dict | None) -> tuple[str, list[RequestResult], float, list[float]]:
    """The load from `clients` processes, each with every clients-th prompt, its share of the concurrency and of
    the rate (N Poisson streams of rate r/N make one of rate r): (model, results, duration, each client's share of
    one core)."""
    clients = max(1, min(clients, len(prompts), concurrency or len(prompts)))
    shares = [ClientShare(base_url, api_key, model, prompts[i::clients], output_len,
                          concurrency // clients + (i < concurrency % clients) if concurrency else None,
                          request_rate / clients, seed + i, structured_outputs, time.time() + (5 if clients > 1 else 0))
              for i in range(clients)]
    if clients == 1:
        done = [run_share(shares[0])]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_share, shares))
    results = [r for _, share_results, _ in done for r in share_results]
    duration = load_duration(results)
    return done[0][0], results, duration, [cpu / duration for *_, cpu in done]


def load_duration(results: list[RequestResult]) -> float:
    """From the first request sent to the last one done: the clients' start-up is not the server's time."""
    return max(r.sent_at + r.latency for r in results) - min(r.sent_at for r in results)


def summarize(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    total = output + sum(r.prompt_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]

    def stats(name: str, values: list[float]) -> dict:
        ms = np.array(values or [0.0]) * 1000
        return {f"mean_{name}_ms": float(ms.mean()), f"p50_{name}_ms": float(np.percentile(ms, 50)),
                f"p99_{name}_ms": float(np.percentile(ms, 99))}

    return {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
            "request_throughput": len(done) / duration, "output_throughput": output / duration,
            "total_token_throughput": total / duration, "total_output_tokens": output,
            **stats("ttft", [r.ttft for r in done]), **stats("tpot", tpot),
            **stats("itl", [gap for r in done for gap in r.itl]),
            "errors": sorted({r.error for r in results if r.error})[:5]}


@bench_app.command("serve")
def bench_serve(
    base_url: Annotated[str, typer.Option(help="The server's OpenAI base URL.")] = "http://127.0.0.1:8000/v1",
    model: Annotated[Optional[str], typer.Option(help="Model name (default: the server's first).")] = None,
    api_key: Annotated[str, typer.Option(envvar="LLMSERVE_API_KEY", help="API key, if the server needs one.")] = "none",
    num_prompts: Annotated[int, typer.Option(help="Requests to send.")] = 64,
    input_len: Annotated[int, typer.Option(help="Tokens per random prompt.")] = 128,
    output_len: Annotated[int, typer.Option(help="Tokens to generate per request (EOS ignored).")] = 64,
    dataset: Annotated[Optional[str], typer.Option(help="A file of prompts (lines, or JSON lines with 'prompt') "
                                                        "instead of random token ids.")] = None,
    vocab_size: Annotated[int, typer.Option(help="Random prompt token ids are drawn below this.")] = 32000,
    concurrency: Annotated[Optional[int], typer.Option(help="Most requests in flight (default: no limit).")] = None,
    clients: Annotated[int, typer.Option(help="Load-generating processes sharing the requests, the concurrency and "
                                              "the rate (more when one client nears a core: see its CPU share).")]
    = 1,
    request_rate: Annotated[float, typer.Option(help="Poisson arrival rate in requests/s (inf: all at once).")]
    = float("inf"),
    seed: Annotated[int, typer.Option(help="Seed for prompts and arrivals.")] = 0,
    result_file: Annotated[Optional[str], typer.Option(help="Write the results as JSON here.")] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to answer first.")] = 0,
    structured_outputs: Annotated[Optional[str], typer.Option(
        help='vLLM\'s structured_outputs for every request, as JSON or @FILE (e.g. \'{"json": {...schema...}}\').')
    ] = None,
) -> None:
    """Load a running server (llmserve or any OpenAI-compatible one) and report throughput, TTFT, TPOT and ITL."""
    try:
        wait_for_server(f"{base_url}/models", ready_timeout, headers={"Authorization": f"Bearer {api_key}"})
    except TimeoutError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(1) from None
    prompts = load_prompts(dataset, num_prompts, input_len, vocab_size, random.Random(seed))
    constraint = read_json_option(structured_outputs)
    model, results, duration, cpu_shares = run_clients(clients, base_url, api_key, model, prompts, output_len,
                                                       concurrency, request_rate, seed, constraint)
    summary = {"model": model, "base_url": base_url, "num_prompts": num_prompts, "input_len": input_len,
               "output_len": output_len, "concurrency": concurrency, "request_rate": request_rate,
               "clients": len(cpu_shares), "client_cpu_max": max(cpu_shares), **summarize(results, duration)}
    if result_file:  # with each request's times, from the first request sent
        first = min(r.sent_at for r in results)
        requests = [{"sent_s": r.sent_at - first, "ttft_s": r.ttft, "latency_s": r.latency,
                     "output_tokens": r.output_tokens, "ok": r.ok} for r in results]
        with open(result_file, "w", encoding="utf-8") as f:
            json.dump(summary | {"requests": requests}, f, indent=2)
    print_table(summary)


def read_json_option(value: str | None) -> dict | None:
    """JSON given inline or as @FILE."""
    if value is None:
        return None
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return json.load(f)
    return json.loads(value)


def print_table(summary: dict) -> None:
    rows = [("Successful requests", summary["completed"], "d"), ("Failed requests", summary["failed"], "d"),
            ("Duration (s)", summary["duration_s"], ".2f"), ("Request throughput (req/s)",
                                                             summary["request_throughput"], ".2f"),
            ("Output token throughput (tok/s)", summary["output_throughput"], ".1f"),
            ("Total token throughput (tok/s)", summary["total_token_throughput"], ".1f")]
    if "client_cpu_max" in summary:
        rows.append((f"Busiest of {summary['clients']} clients (cores)", summary["client_cpu_max"], ".2f"))
    for name in ("ttft", "tpot", "itl"):
        rows += [(f"{kind.capitalize()} {name.upper()} (ms)", summary[f"{kind}_{name}_ms"], ".1f")
                 for kind in ("mean", "p50", "p99")]
    typer.echo("=" * 50)
    for label, value, fmt in rows:
        typer.echo(f"{label:<38}{value:>12{fmt}}")
    typer.echo("=" * 50)
    for error in summary["errors"]:
        typer.secho(f"error: {error}", err=True, fg="red")
