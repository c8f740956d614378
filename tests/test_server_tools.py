"""Structured outputs, tool calls and reasoning over HTTP: a real `llm serve` on the embedded model, driven with the
official `openai` client (its .parse() with pydantic models, a two-turn tool loop, streamed deltas)."""
import json
import re
from enum import Enum

import openai
import pytest
from pydantic import BaseModel, Field
from conftest import greedy
from server_utils import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
# Qwen2.5's way of offering tools and reading their results (hermes style), short.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n<tools>\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}</tools>\nReply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n"
    "{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    process = ServerProcess("--served-model-name", MODEL, "--chat-template", str(template),
                            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


class Color(str, Enum):
    red = "red"
    green = "green"


class Item(BaseModel):
    name: str = Field(max_length=12)  # bounded, or a small model may write one string forever
    count: int


class Order(BaseModel):
    customer: str = Field(max_length=20)
    color: Color
    items: list[Item] = Field(min_length=1, max_length=3)
    rush: bool


class Point(BaseModel):
    x: int
    y: int


SAMPLING = [dict(temperature=0), dict(temperature=1.0, seed=7)]


@pytest.mark.parametrize("schema", [Point, Order], ids=["flat", "nested-enum-array"])
@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "temp1"])
def test_parse_returns_a_valid_object(client, schema, sampling):
    reply = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Make one up, as JSON."}], response_format=schema,
        max_tokens=300, **sampling)
    assert isinstance(reply.choices[0].message.parsed, schema), reply.choices[0].message.content


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "temp1"])
def test_json_object_regex_and_choice(client, sampling):
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Answer."}], max_tokens=120, **sampling)
    reply = client.chat.completions.create(response_format={"type": "json_object"}, **chat)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    pattern = r"[A-Z][a-z]{2,8} \d{2}"
    completion = client.completions.create(model=MODEL, prompt="A name and an age:", max_tokens=20,
                                           extra_body={"structured_outputs": {"regex": pattern}}, **sampling)
    assert re.fullmatch(pattern, completion.choices[0].text)
    choices = ["positive", "negative", "neutral"]
    reply = client.chat.completions.create(extra_body={"structured_outputs": {"choice": choices}}, **chat)
    assert reply.choices[0].message.content in choices


def test_bad_grammar_is_a_400_and_nothing_is_left_behind(client, server):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"structured_outputs": {"regex": "([unclosed"}})
    assert refused.value.body["param"] == "structured_outputs.regex"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert refused.value.body["param"] == "structured_outputs"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].finish_reason == "length"


def ask_weather(client, stream: bool, **tool_args):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    request = dict(model=MODEL, messages=messages, tools=[WEATHER, TIME], max_tokens=250, temperature=0)
    if not stream:
        reply = client.chat.completions.create(**request, **tool_args)
        return messages, reply.choices[0].message, reply.choices[0].finish_reason
    calls, content, finish = [], "", None
    for chunk in client.chat.completions.create(**request, **tool_args, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    return messages, type("Message", (), {"content": content, "tool_calls": calls})(), finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_two_turn_tool_loop(client, stream, tool_choice):
    messages, message, finish = ask_weather(client, stream, tool_choice=tool_choice)
    assert finish == "tool_calls" and message.tool_calls
    call = message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    if call.function.name == "get_weather":
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call.id, "type": "function",
                      "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                 {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice="none",
                                           max_tokens=20, temperature=0)
    assert final.choices[0].finish_reason == "length" and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls


def test_parallel_tool_calls_false_gives_one_call(client):
    _, message, finish = ask_weather(client, False, tool_choice="required", parallel_tool_calls=False)
    assert finish == "tool_calls" and len(message.tool_calls) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_tool_choice_parses_the_models_call(client, stream):
    """The hermes parser on a reply held (by a regex) to a model's tool-call text, with reasoning before it."""
    text = ('<think>The user wants weather.</think>\nChecking.<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    _, message, finish = ask_weather(client, stream, extra_body={"structured_outputs": {"regex": re.escape(text)}})
    assert finish == "tool_calls" and message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_reasoning_is_split_from_the_answer(client, stream):
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=40,
                   temperature=0, extra_body={"structured_outputs": {"regex": r"<think>[a-z ]{5,20}</think>Paris\."}})
    if stream:
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(**request, stream=True):
            delta = chunk.choices[0].delta.model_dump()
            reasoning += delta.get("reasoning") or ""
            content += delta.get("content") or ""
    else:
        message = client.chat.completions.create(**request).choices[0].message.model_dump()
        reasoning, content = message["reasoning"], message["content"]
    assert re.fullmatch(r"[a-z ]{5,20}", reasoning) and content == "Paris."


def test_tool_mistakes_are_400s(client):
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    cases = [(dict(tool_choice="required"), "tool_choice"),
             (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
             (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
             (dict(extra_body={"chat_template_kwargs": {"tools": []}}), "chat_template_kwargs")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**chat, **extra)
        assert refused.value.body["param"] == param


def test_chat_template_kwargs_and_tools_reach_the_template_offline(llm):
    template = "{{ greeting }}{% for t in tools or [] %} [{{ t.function.name }}]{% endfor %}: {{ messages[0].content }}"
    out = llm.chat([{"role": "user", "content": "Hi"}], greedy(1), chat_template=template, tools=[WEATHER],
                   chat_template_kwargs={"greeting": "Hola"}, use_tqdm=False)[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == "Hola [get_weather]: Hi"
