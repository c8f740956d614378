"""The server in this process (uvicorn in a thread, real engine, real socket), where a step can be made to fail:
engine faults, a dead engine, a model without a chat template, and generation_config defaults."""
import json
import os
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from server_utils import free_port

from llmserve.async_engine import AsyncEngine
from llmserve.config import EngineConfig
from llmserve.loader import find_model
from llmserve.server.app import create_app
from llmserve.tokenizer import apply_chat_template

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def model_without_template(tmp_path_factory):
    """The default model's files, without its chat template, with a generation_config that makes greedy the default."""
    source, folder = find_model(None), tmp_path_factory.mktemp("no-template")
    for name in os.listdir(source):
        if name == "tokenizer_config.json":
            with open(os.path.join(source, name)) as f:
                config = {k: v for k, v in json.load(f).items() if k != "chat_template"}
            (folder / name).write_text(json.dumps(config))
        elif name != "chat_template.jinja":
            os.symlink(os.path.join(source, name), folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))
    return str(folder)


@pytest.fixture(scope="module")
def served(model_without_template):
    engine = AsyncEngine(EngineConfig(model=model_without_template, dtype="float32", kv_cache_memory_bytes=64 << 20),
                         in_process=True)  # the tests reach into the engine
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ["m"]), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield engine, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    server.should_exit = True
    thread.join(10)
    engine.shutdown()


def complete(client, **kwargs):
    return client.completions.create(model="m", prompt="The capital of France is", **kwargs)


def test_generation_config_gives_the_defaults(served):
    engine, client = served
    assert engine.engine.sampling_defaults == {"temperature": 0.0, "max_tokens": 5}
    texts = {complete(client, max_tokens=5).choices[0].text for _ in range(3)}
    assert len(texts) == 1  # greedy, from generation_config.json
    assert engine.engine.default_sampling_params().max_tokens == 5  # what LLM.generate uses without params


def test_chat_without_a_template_is_a_400_and_a_template_file_works(served, tmp_path):
    engine, client = served
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    tokenizer = engine.engine.tokenizer
    from_file = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}], str(tmp_path / "template.jinja"))
    assert tokenizer.decode(from_file) == "<user>Hi\n<assistant>"


def test_engine_fault_is_a_500_and_the_server_goes_on(served):
    engine, client = served
    runner = engine.engine.runner
    real_launch = runner.launch

    def fail_once(*args):
        runner.launch = real_launch
        raise RuntimeError("injected fault")

    runner.launch = fail_once
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        complete(client, max_tokens=4)
    assert engine.alive and engine.engine.kv.num_used_blocks == 0
    assert complete(client, max_tokens=4).choices[0].text


def test_unexpected_error_is_a_500_with_the_request_id(served):
    engine, client = served
    real_tokenize = engine.tokenize

    def fail_once(prompt):
        engine.tokenize = real_tokenize
        raise RuntimeError("injected fault outside the engine")

    engine.tokenize = fail_once
    url = str(client.base_url) + "completions"
    response = httpx.post(url, json={"model": "m", "prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "r-9"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "r-9"
    assert response.json()["error"]["message"] == "internal error: RuntimeError"
    assert complete(client, max_tokens=2).choices[0].text


def test_dead_engine_is_a_503_on_health(served):
    engine, client = served
    engine.shutdown()
    response = httpx.get(str(client.base_url).replace("/v1/", "/health"))
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
    with pytest.raises(openai.APIStatusError) as error:
        complete(client, max_tokens=2)
    assert error.value.status_code == 503
