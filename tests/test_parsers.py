"""Tool-call and reasoning parsers on model-style replies, whole and as they stream in."""
import pytest

from llmserve.server.parsers import ForcedToolCalls, ReplyParser, ToolCall, load_parser, tool_call_schema


def tool_parser(name: str):
    return load_parser("tool_parser", name)()


def reasoning_parser(name: str):
    return load_parser("reasoning_parser", name)()


@pytest.mark.parametrize("name, text, content, calls", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me check.\n",
     [ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_time", {})]),
    ("hermes", "No tools needed.", "No tools needed.", []),
    ("hermes", "<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [ToolCall("get_weather", {"city": "Paris"})]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', "",
     [ToolCall("a", {"x": 1}), ToolCall("b", {})]),
    ("llama3_json", "The answer is {x}.", "The answer is {x}.", []),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', "",
     [ToolCall("a", {"x": 1}), ToolCall("b", {})]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "Sure.",
     [ToolCall("get_weather", {"city": "Paris"})]),
])
def test_tool_parsers(name, text, content, calls):
    assert tool_parser(name).split(text, finished=True) == (content, calls)


@pytest.mark.parametrize("name, text, shown", [
    ("hermes", "Sure. <tool_ca", "Sure. "),  # a marker may be starting: held back
    ("hermes", 'Sure. <tool_call>{"name": "a"', "Sure. "),
    ("llama3_json", '{"name": "a", "param', ""),
    ("llama3_json", "<|python", ""),
    ("mistral", "ok [TOOL", "ok "),
    ("hermes", "Plain text so far", "Plain text so far"),
])
def test_streaming_holds_back_what_may_be_a_call(name, text, shown):
    assert tool_parser(name).split(text, finished=False) == (shown, [])


@pytest.mark.parametrize("name, text, finished, reasoning, rest", [
    ("qwen3", "<think>\nThe user asks.\n</think>\n\nParis.", True, "The user asks.", "Paris."),
    ("qwen3", "Paris.", True, None, "Paris."),  # thinking off
    ("qwen3", "<thi", False, None, ""),
    ("qwen3", "<think>still going </thi", False, "still going ", ""),
    ("deepseek_r1", "First, recall.</think>Paris.", True, "First, recall.", "Paris."),
    ("deepseek_r1", "First, recall", False, "First, recall", ""),
    ("deepseek_r1", "Never closed", True, "Never closed", ""),
])
def test_reasoning_parsers(name, text, finished, reasoning, rest):
    assert reasoning_parser(name).split(text, finished) == (reasoning, rest)


def test_reply_parser_reads_reasoning_then_tool_calls():
    parser = ReplyParser(reasoning_parser("qwen3"), tool_parser("hermes"), parallel_tool_calls=False)
    text = ('<think>Need weather.</think>\n<tool_call>{"name": "a", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    parts = parser.parse(text, finished=True)
    assert (parts.reasoning, parts.content, parts.tool_calls) == ("Need weather.", "", [ToolCall("a", {})])


def test_forced_tool_calls_and_their_schema():
    tools = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer"}}}}}, {"type": "function", "function": {"name": "b"}}]
    assert tool_call_schema(tools, "a", True) == tools[0]["function"]["parameters"]
    required = tool_call_schema(tools, None, parallel=False)
    assert required["maxItems"] == 1 and [c["properties"]["name"]["const"] for c in required["items"]["anyOf"]] == [
        "a", "b"]
    assert ForcedToolCalls("a").split('{"x": 3}', True) == ("", [ToolCall("a", {"x": 3})])
    assert ForcedToolCalls().split('[{"name": "b", "parameters": {}}]', True) == ("", [ToolCall("b", {})])
    assert ForcedToolCalls().split('[{"name": "b", "param', True) == ('[{"name": "b", "param', [])


def test_unknown_parser_is_named():
    with pytest.raises(ValueError, match="unknown tool parser 'nope'; registered: hermes, llama3_json, mistral"):
        load_parser("tool_parser", "nope")


def test_streamed_reasoning_only_grows():
    """Each partial reply's reasoning is a prefix of the next one's, and of the finished reply's."""
    parser = reasoning_parser("qwen3")
    full = "<think>\nLet me think.\n</think>\n\nHi"
    seen = [parser.split(full[:n], finished=False)[0] or "" for n in range(len(full))]
    final = parser.split(full, finished=True)[0]
    assert final == "Let me think."
    assert all(final.startswith(part) for part in seen)


def test_required_tool_schema_hoists_definitions():
    item = {"type": "object", "properties": {"n": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "$defs": {"Item": item}}}},
             {"type": "function", "function": {"name": "b", "parameters": {"type": "object", "$defs": {"Item": item}}}}]
    schema = tool_call_schema(tools, None, True)
    assert schema["$defs"] == {"Item": item}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    clash = [tools[0], {"type": "function", "function": {"name": "c", "parameters": {"$defs": {"Item": {}}}}}]
    with pytest.raises(ValueError, match=r"tools define \$defs/Item differently"):
        tool_call_schema(clash, None, True)


def test_parsers_of_special_token_markers_ask_for_special_tokens():
    assert tool_parser("mistral").needs_special_tokens and tool_parser("llama3_json").needs_special_tokens
    assert not tool_parser("hermes").needs_special_tokens


def test_a_grammar_held_reply_is_not_read_as_reasoning_the_prompt_opened():
    """DeepSeek-R1's parser takes a reply as reasoning until </think>; a forced tool call never writes one."""
    from llmserve.server.app import ChatParsing, Server
    from llmserve.server.protocol import ChatRequest, RequestLimits

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for parser, kept in (("deepseek_r1", False), ("qwen3", True)):
        server = Server(None, ["m"], None, RequestLimits(), ChatParsing(reasoning_parser=parser))
        _, reply, forced = server.tool_plan(ChatRequest(messages=[{"role": "user", "content": "Hi"}], tools=tools,
                                                        tool_choice="required"))
        assert forced is not None and (reply.reasoning is not None) == kept
        assert reply.parse('[{"name": "f", "parameters": {}}]', True).tool_calls == [ToolCall("f", {})]
