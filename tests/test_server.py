"""`llm serve` as a real subprocess, driven with the official openai client; results equal the offline API's."""
import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest
from conftest import PROMPTS
from server_utils import ServerProcess, metric, run_cli

from llmserve import SamplingParams

API_KEY = "test-key"
MODEL = "smol"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len", "1024")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def offline(llm, prompts, **params):
    return [o.outputs for o in llm.generate(prompts, SamplingParams(**params), use_tqdm=False)]


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "llmserve" and models[0].model_extra["max_model_len"] == 1024


def test_completions_equal_offline(client, llm):
    prompts = PROMPTS[:4]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0)
    expected = offline(llm, prompts, max_tokens=12, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == [e[0].text for e in expected]
    assert [c.finish_reason for c in response.choices] == [e[0].finish_reason for e in expected]
    prompt_tokens = sum(len(llm.engine.tokenize(p)) for p in prompts)
    completion_tokens = sum(len(e[0].token_ids) for e in expected)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


def test_token_id_prompts(client, llm):
    ids = [llm.engine.tokenize(p) for p in PROMPTS[:2]]
    texts = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices
             for prompt in (ids[0], ids, PROMPTS[0])]
    assert texts[0][0].text == texts[1][0].text == texts[2][0].text
    assert texts[1][1].text == offline(llm, [PROMPTS[1]], max_tokens=8, temperature=0)[0][0].text


def test_n_and_seed(client):
    def sample(seed):
        response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, n=2,
                                             temperature=0.9, seed=seed)
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    first = sample(3)
    assert len(first) == 2 and first[0] != first[1]
    assert sample(3) == first and sample(4) != first


def test_stop_strings(client, llm):
    prompt = "1, 2, 3, 4,"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[" 7"])
    expected = offline(llm, [prompt], max_tokens=20, temperature=0, stop=[" 7"])[0][0]
    assert response.choices[0].text == expected.text and " 7" not in expected.text
    assert response.choices[0].finish_reason == "stop" and response.choices[0].model_extra["stop_reason"] == " 7"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[" 7"],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text  # a partial stop string is held back


def test_logprobs_and_echo(client, llm):
    prompt = "The capital of France is"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    expected = offline(llm, [prompt], max_tokens=6, temperature=0, logprobs=3)[0][0]
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(expected.token_ids) == len(lp.top_logprobs)
    for value, token, position in zip(lp.token_logprobs, expected.token_ids, expected.logprobs):
        assert value == pytest.approx(position[token].logprob, abs=1e-4)
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)

    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=1, echo=True)
    choice = echoed.choices[0]
    assert choice.text == prompt + response.choices[0].text
    prompt_len = len(llm.engine.tokenize(prompt))
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == prompt_len + 6
    assert all(v is not None for v in choice.logprobs.token_logprobs[1:])


def test_chat_equals_offline_streamed_or_not(client, llm):
    expected = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    response = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=24)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert "Paris" in response.choices[0].message.content and response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.outputs[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == response.usage.total_tokens


def test_chat_logprobs_and_text_parts(client):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}, *CHAT]
    response = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=5,
                                              logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert "".join(c.token for c in content).strip() == response.choices[0].message.content.strip()


def test_64_concurrent_streams_are_batched(server, llm):
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(64)]
    expected = [o[0].text for o in offline(llm, prompts, max_tokens=10, temperature=0)]

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                      stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == expected
    assert metric(server.url, "llmserve:max_batch_size") > 1
    assert metric(server.url, "llmserve:time_to_first_token_seconds_count") >= 64


def test_disconnect_frees_kv_blocks(server):
    generated_before = metric(server.url, "llmserve:generation_tokens_total")
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 900, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert metric(server.url, "llmserve:kv_cache_used_blocks") > 0
    for _ in range(100):
        if metric(server.url, "llmserve:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert metric(server.url, "llmserve:kv_cache_used_blocks") == 0
    assert metric(server.url, "llmserve:generation_tokens_total") - generated_before < 900  # it was stopped early


def post(server, path: str, body=None, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2} | fields


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", completion(temperature=-1), 400, "temperature"),
    ("/v1/completions", completion(top_p=2), 400, "top_p"),
    ("/v1/completions", completion(n=0), 400, "n"),
    ("/v1/completions", completion(max_tokens=0), 400, "max_tokens"),
    ("/v1/completions", completion(logprobs=50), 400, "logprobs"),
    ("/v1/completions", completion(temperature="hot"), 400, "temperature"),
    ("/v1/completions", completion(prompt=""), 400, "prompt"),
    ("/v1/completions", completion(prompt=[]), 400, "prompt"),
    ("/v1/completions", completion(prompt="word " * 1100), 400, "prompt"),
    ("/v1/completions", completion(prompt=[1, 2, 10**9]), 400, "prompt"),
    ("/v1/completions", completion(suffix="!"), 400, "suffix"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", completion(model="gpt-9"), 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 99, "logprobs": True}, 400,
     "top_logprobs"),
    ("/v1/nothing-here", {}, 404, None),
])
def test_errors(server, path, body, status, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param, error
    assert post(server, "/v1/completions", completion()).status_code == 200


def test_auth_size_and_json_errors(server):
    for key in (None, "wrong-key"):
        response = post(server, "/v1/completions", completion(), key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # only /v1 needs the key
    huge = post(server, "/v1/completions", completion(prompt="x" * (9 << 20)))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    chunked = post(server, "/v1/completions", None, content=iter([b"{" + b" " * (9 << 20) + b"}"]))
    assert chunked.status_code == 413
    broken = post(server, "/v1/completions", None, content=b"{not json")
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    assert post(server, "/v1/completions", completion()).status_code == 200


def test_tokenize_detokenize_version_metrics(server, llm):
    tokens = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["tokens"] == llm.engine.tokenize("Hello world") and tokens["count"] == len(tokens["tokens"])
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == "Hello world"
    chat_tokens = post(server, "/tokenize", {"messages": CHAT}).json()["tokens"]
    assert chat_tokens == llm.chat(CHAT, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
    assert post(server, "/detokenize", {"tokens": [10**9]}).status_code == 400
    assert httpx.get(f"{server.url}/version").json()["version"]
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket"):
        assert f"llmserve:{name}" in text, name
    assert json.loads(json.dumps(tokens))  # plain JSON


@pytest.mark.parametrize("clients", [1, 2])
def test_bench_serve(server, tmp_path, clients):
    """One client process, or two sharing the requests and the concurrency; each reports its CPU share."""
    result_file = tmp_path / "bench.json"
    done = run_cli("bench", "serve", "--base-url", f"{server.url}/v1", "--api-key", API_KEY, "--num-prompts", "8",
                   "--input-len", "16", "--output-len", "8", "--concurrency", "4", "--clients", str(clients),
                   "--result-file", str(result_file))
    assert done.returncode == 0, done.stderr
    assert "Output token throughput" in done.stdout and "P99 TTFT" in done.stdout
    results = json.loads(result_file.read_text())
    assert (results["completed"], results["failed"], results["total_output_tokens"]) == (8, 0, 64)
    assert results["mean_ttft_ms"] > 0 and results["mean_tpot_ms"] > 0
    assert results["clients"] == clients and 0 < results["client_cpu_max"] < 2


def test_chat_against_server(server):
    done = run_cli("chat", "--url", f"{server.url}/v1", "--api-key", API_KEY, "--temperature", "0", "--max-tokens",
                   "16", stdin="What is the capital of France?\n\n")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_shutdown_on_signal_with_a_request_in_flight(signal_name):
    process = ServerProcess()
    body = {"prompt": "Count to a thousand:", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        process.process.send_signal(getattr(signal, signal_name))
        try:
            for _ in lines:  # the stream ends (finished or cut) instead of hanging
                pass
        except httpx.HTTPError:
            pass
    assert process.process.wait(30) == 0, process.output()
    assert "llmserve stopped" in process.output()


def test_a_dead_engine_process_turns_health_503_ends_the_streams_and_exits_non_zero():
    """The engine steps in a process of its own: when it dies, a stream in flight ends with an error event instead of
    hanging, /health answers 503 and the server exits 1 (for a supervisor to restart it)."""
    process = ServerProcess()
    engine = process.engine_process()
    body = {"prompt": "Count to a thousand:", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        os.kill(engine, signal.SIGKILL)
        events = [line for line in lines if line.startswith("data:")]
    assert any('"engine_dead"' in event or "the engine has stopped" in event for event in events), events[-3:]
    statuses = process.health_until_exit(30)
    assert process.process.wait(timeout=30) == 1, process.output()
    assert 503 in statuses and "the engine process exited" in process.output()
