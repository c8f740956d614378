"""What a vLLM user brings to `llm serve`: VLLM_API_KEY and `--api-key k1 k2`, `--model`, CORS, TLS, X-Request-Id, tool
turns in chat; and a server that refuses, by name, every field it does not honour and every request past its bounds
(real `llm serve` processes on loopback, driven over HTTP and with the official `openai` client)."""
import json
import subprocess

import httpx
import openai
import pytest
from server_utils import ServerProcess

from llmserve import LLM

ORIGIN = "http://app.example"
# A chat template that knows tool calls and tool results, and refuses a system message (as some models' do).
TOOL_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}{% endif %}"
    "{% if m['role'] == 'tool' %}[{{ m['tool_call_id'] }}] {% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def server():
    """Keys from VLLM_API_KEY (two, space-separated), CORS for one origin, strict fields, default bounds."""
    process = ServerProcess("--allowed-origins", ORIGIN, "--max-model-len", "1024",
                            env={"VLLM_API_KEY": "key-one key-two", "LLMSERVE_API_KEY": ""})
    yield process
    process.stop()


def post(server, path: str, body: dict | str, key: str | None = "key-one", **headers) -> httpx.Response:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"} | headers,
                      timeout=60)


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def test_vllm_api_key_holds_several_keys(server):
    assert post(server, "/v1/chat/completions", CHAT, key=None).status_code == 401
    assert post(server, "/v1/chat/completions", CHAT, key="wrong").status_code == 401
    for key in ("key-one", "key-two"):
        assert post(server, "/v1/chat/completions", CHAT, key=key).status_code == 200
    assert post(server, "/v1/chat/completions", CHAT, key=None, Authorization="bearer key-two").status_code == 200


def test_cors_preflight_needs_no_key_and_only_allowed_origins_get_headers(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": ORIGIN} | preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": "http://evil.example"} | preflight)
    assert "access-control-allow-origin" not in other.headers
    reply = post(server, "/v1/chat/completions", CHAT, Origin=ORIGIN)
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == ORIGIN


def test_request_id_is_echoed_and_names_the_response(server):
    reply = post(server, "/v1/chat/completions", CHAT, **{"X-Request-Id": "trace-42"})
    assert reply.headers["x-request-id"] == "trace-42" and reply.json()["id"] == "chatcmpl-trace-42"
    fresh = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
    assert fresh.json()["id"] == f"cmpl-{fresh.headers['x-request-id']}"
    usage = fresh.json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


# Every field of OpenAI's chat and completions APIs that llmserve does not honour (the rest it does), and one made up.
NOT_HONOURED = {"/v1/chat/completions": {
    "reasoning_effort": "low", "prediction": {"type": "content", "content": "x"}, "audio": {"voice": "alloy"},
    "modalities": ["text"], "metadata": {"k": "v"}, "store": True, "service_tier": "auto", "verbosity": "low",
    "web_search_options": {}, "prompt_cache_key": "k", "safety_identifier": "s", "functions": [{"name": "f"}],
    "function_call": "auto"}, "/v1/completions": {"best_of": 2, "suffix": "x", "no_such_field": 1}}


@pytest.mark.parametrize("path, field, value", [(path, field, value) for path, fields in NOT_HONOURED.items()
                                                 for field, value in fields.items()])
def test_fields_not_honoured_are_refused_by_name(server, path, field, value):
    body = (CHAT if "chat" in path else {"prompt": "Hi", "max_tokens": 2}) | {field: value}
    reply = post(server, path, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field and field in reply.json()["error"]["message"]


def test_tools_need_auto_tool_choice_enabled_or_another_choice(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    reply = post(server, "/v1/chat/completions", CHAT | {"tools": tools})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in reply.json()["error"]["message"]
    assert post(server, "/v1/chat/completions", CHAT | {"tools": tools, "tool_choice": "none"}).status_code == 200


def test_a_reply_sent_back_as_received_is_accepted(server):
    """Clients append the reply message they got (with its empty refusal, annotations, reasoning) to the next turn."""
    reply = post(server, "/v1/chat/completions", CHAT).json()["choices"][0]["message"]
    sent_back = reply | {"refusal": None, "annotations": [], "audio": None, "function_call": None,
                         "reasoning": "thought about it"}
    messages = CHAT["messages"] + [sent_back, {"role": "user", "content": "And then?"}]
    assert post(server, "/v1/chat/completions", CHAT | {"messages": messages}).status_code == 200
    refused = post(server, "/v1/chat/completions", CHAT | {"messages": [sent_back | {"refusal": "no"}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages.0.refusal"


def test_zero_max_tokens_is_refused_not_ignored(server):
    reply = post(server, "/v1/chat/completions", CHAT | {"max_tokens": 0})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_several_keys_without_a_model_is_refused_not_guessed():
    from server_utils import run_cli

    done = run_cli("serve", "--api-key", "secret", "Qwen/Qwen3-0.6B")
    assert done.returncode == 2 and "--api-key took several values and no MODEL was given" in done.stderr


def test_unknown_message_fields_are_refused(server):
    reply = post(server, "/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "Hi", "x": 1}]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages.0.x"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e309}', "temperature"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "top_p": NaN}', None),
    ("/v1/chat/completions", CHAT | {"n": 129}, "n"),
    ("/v1/completions", {"prompt": ["Hi"] * 257, "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["x"] * 33}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop": "x" * 1025}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", CHAT | {"n": 128, "max_tokens": 40000}, "max_tokens"),
    ("/v1/completions", {"prompt": ["Hi"] * 200, "n": 32, "max_tokens": 1000}, "max_tokens"),
])
def test_bounds_are_400s_naming_the_field_and_the_server_goes_on(server, path, body, param):
    reply = post(server, path, body)
    assert reply.status_code == 400, reply.text
    if param:  # invalid JSON (NaN) is refused before any field is read
        assert reply.json()["error"]["param"] == param
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200


def test_openai_client_sees_the_refusal(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="key-one", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT["messages"], max_tokens=2,
                                       extra_body={"no_such_field": 5})
    assert refused.value.body["param"] == "no_such_field"


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """--model, `--api-key k1 k2` after one flag, a tool-aware chat template, unknown fields dropped (vLLM's way)."""
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    process = ServerProcess("--model", "SmolLM2-135M-Instruct", "--chat-template", str(template),
                            "--allow-unknown-fields", "--api-key", "k1", "k2")
    yield process
    process.stop()


def test_api_key_takes_several_values_after_one_flag(tool_server):
    for key in ("k1", "k2"):
        assert post(tool_server, "/v1/chat/completions", CHAT, key=key).status_code == 200
    assert post(tool_server, "/v1/chat/completions", CHAT, key="k3").status_code == 401


def test_tool_turns_reach_the_chat_template(tool_server):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    tokens = post(tool_server, "/tokenize", {"messages": messages}, key="k1").json()["tokens"]
    rendered = post(tool_server, "/detokenize", {"tokens": tokens}, key="k1").json()["prompt"]
    assert '<tool_call>get_weather {"city": "Paris"}</tool_call>' in rendered
    assert "[call_1] 18 C and sunny" in rendered
    reply = post(tool_server, "/v1/chat/completions", CHAT | {"messages": messages}, key="k1")
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"


def test_template_errors_are_400s(tool_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = post(tool_server, "/v1/chat/completions", CHAT | {"messages": messages}, key="k1")
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert "System role not supported" in reply.json()["error"]["message"]


def test_unknown_fields_dropped_with_a_warning_when_asked(tool_server):
    reply = post(tool_server, "/v1/chat/completions", CHAT | {"no_such_field": 1}, key="k1")
    assert reply.status_code == 200
    assert "dropped unknown fields ['no_such_field']" in tool_server.output()


def test_tls_and_root_path(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    process = ServerProcess("--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--root-path", "/llm",
                            "--api-key", "k", scheme="https", verify=str(cert))
    try:
        assert httpx.get(f"{process.url}/v1/models", verify=str(cert)).status_code == 401  # the key still holds
        reply = httpx.get(f"{process.url}/v1/models", verify=str(cert), headers={"Authorization": "Bearer k"})
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        assert httpx.get(f"{process.url}/openapi.json", verify=str(cert)).json()["servers"] == [{"url": "/llm"}]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{process.port}/health")  # plain HTTP is not served
    finally:
        process.stop()


def test_vllm_engine_arguments_are_honoured_or_refused_by_name(llm):
    assert llm.llm_engine is llm.engine
    assert llm.get_default_sampling_params().max_tokens == 16
    for name, value in (("tokenizer_mode", "slow"), ("trust_remote_code", True), ("enable_chunked_prefill", False)):
        with pytest.raises(ValueError, match=f"^{name} is not supported with this value yet.*supported"):
            LLM(**{name: value})
    with pytest.raises(ValueError, match=r"^kv_cache_dtype must be one of \['auto', 'fp8', 'fp8_e4m3'\], got 'fp8_e5m2'"):
        LLM(kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="unknown engine argument.*swap_space"):
        LLM(swap_space=4)


def test_max_logprobs_bounds_offline_requests(llm):
    from conftest import greedy

    with pytest.raises(ValueError, match=r"^logprobs must be at most 20 \(the engine's max_logprobs\)"):
        llm.generate("Hi", greedy(1, logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt_logprobs must be at most 20"):
        llm.generate("Hi", greedy(1, prompt_logprobs=25), use_tqdm=False)
