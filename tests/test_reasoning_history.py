"""Reasoning kept in history (issue 37, item 2): an earlier assistant turn's thinking (Anthropic `thinking` blocks,
OpenAI chat's `reasoning_content`, Responses `reasoning` items, Ollama's `thinking`) reaches the chat template as
`reasoning_content`, as llama-server passes it, and so counts in count_tokens, input_tokens and usage; a template
that drops old reasoning (Qwen3's rule: only turns after the last user query show it) still drops it.

The template here is written for the test in Qwen3's shape (ChatML, tools, `<think>` around reasoning_content after
the last user query); the model is the starter model, which never reads it: these tests check the prompt, not
what a model makes of it. llama.cpp's two cases (test_compat_anthropic.py: thinking history in the template and in
count_tokens) are ported as the first two tests."""

from __future__ import annotations

import pytest

from tests.harness import openai_client_for
from tests.test_agent_apis import anthropic_client_for

QWEN3_LIKE = """{%- if tools %}<|im_start|>system
Tools: {{ tools | tojson }}<|im_end|>
{% endif -%}
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor -%}
{%- for m in messages -%}
<|im_start|>{{ m.role }}
{% if m.role == 'assistant' and m.reasoning_content and loop.index0 > ns.last_query %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>
{{ c.function | tojson }}
</tool_call>{% endfor %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""

LIST_FILES = {"name": "list_files", "description": "List files", "input_schema": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
REASONING_1 = "I should check the project structure first."
REASONING_2 = "Now I need to read the main file."


@pytest.fixture(scope="module")
def thinking_server(starter_model, tmp_path_factory):
    from tests.harness import ServerProcess
    template = tmp_path_factory.mktemp("template") / "qwen3-like.jinja"
    template.write_text(QWEN3_LIKE)
    s = ServerProcess(["--model", starter_model, "--contextsize", "1024", "--chat-template", str(template)])
    yield s
    s.stop()


def openai_turns(reasoning: bool) -> list[dict]:
    def call(i: int, name: str, path: str) -> dict:
        return {"id": f"call_{i}", "type": "function",
                "function": {"name": name, "arguments": '{"path": "%s"}' % path}}
    extra = (lambda text: {"reasoning_content": text}) if reasoning else (lambda text: {})
    return [{"role": "user", "content": "Fix the bug in main.py"},
            {"role": "assistant", "content": "", **extra(REASONING_1), "tool_calls": [call(1, "list_files", ".")]},
            {"role": "tool", "tool_call_id": "call_1", "content": "main.py\nutils.py"},
            {"role": "assistant", "content": "", **extra(REASONING_2), "tool_calls": [call(2, "read_file", "main.py")]},
            {"role": "tool", "tool_call_id": "call_2", "content": "print('hello')"}]


def test_reasoning_content_in_history_is_in_the_template(thinking_server):
    prompt = thinking_server.json("POST", "/apply-template", {"messages": openai_turns(True), "tools": [
        {"type": "function", "function": {"name": n, "parameters": LIST_FILES["input_schema"]}}
        for n in ("list_files", "read_file")]})["prompt"]
    assert REASONING_1 in prompt and REASONING_2 in prompt and prompt.count("<think>") >= 2, prompt
    assert "Tools:" in prompt and "read_file" in prompt           # the request's tools reach the template too
    without = thinking_server.json("POST", "/apply-template", {"messages": openai_turns(False)})["prompt"]
    assert "<think>" not in without


def anthropic_turns(thinking: bool) -> list[dict]:
    first = [{"type": "thinking", "thinking": "I should check the project structure first to understand the "
                                              "codebase layout.", "signature": "sig"}] if thinking else []
    return [{"role": "user", "content": "Fix the bug"},
            {"role": "assistant", "content": first + [
                {"type": "tool_use", "id": "call_1", "name": "list_files", "input": {"path": "."}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "main.py"}]}]


def test_anthropic_thinking_in_history_counts_in_count_tokens_and_usage(thinking_server):
    client = anthropic_client_for(thinking_server)
    count = {t: client.messages.count_tokens(model="m", tools=[LIST_FILES], messages=anthropic_turns(t)).input_tokens
             for t in (False, True)}
    assert count[True] > count[False] + 10, count
    made = client.messages.create(model="m", max_tokens=1, tools=[LIST_FILES], messages=anthropic_turns(True))
    u = made.usage
    assert u.input_tokens + u.cache_read_input_tokens == count[True]     # the prompt read is the prompt counted


def test_openai_chat_reasoning_content_in_history_is_read(thinking_server):
    client = openai_client_for(thinking_server)
    turns = openai_turns(True)
    used = {}
    for key in ("reasoning_content", "reasoning", None):       # llama-server's name, OpenRouter's, none
        messages = [{k if k != "reasoning_content" or key is None else key: v for k, v in m.items()
                     if key is not None or k != "reasoning_content"} for m in turns]
        used[key] = client.chat.completions.create(model="m", max_tokens=1, messages=messages).usage.prompt_tokens
    assert used["reasoning_content"] == used["reasoning"] > used[None] + 10, used


def test_responses_reasoning_items_and_ollama_thinking_are_read(thinking_server):
    client = openai_client_for(thinking_server)

    def items(reasoning: bool) -> list:
        think = [{"type": "reasoning", "id": "rs_1", "summary": [],
                  "content": [{"type": "reasoning_text", "text": REASONING_1}]}] if reasoning else []
        return [{"role": "user", "content": "Fix the bug"}, *think,
                {"type": "function_call", "call_id": "c1", "name": "list_files", "arguments": '{"path": "."}'},
                {"type": "function_call_output", "call_id": "c1", "output": "main.py"}]
    count = {r: client.post("/responses/input_tokens", cast_to=object, body={"model": "m", "input": items(r)})[
        "input_tokens"] for r in (False, True)}
    assert count[True] > count[False] + 5, count

    def ollama(thinking: bool) -> int:
        think = {"thinking": REASONING_1} if thinking else {}
        body = {"model": "m", "stream": False, "options": {"num_predict": 1}, "messages": [
            {"role": "user", "content": "Fix the bug"}, {"role": "assistant", "content": "Done.", **think},
            {"role": "tool", "content": "main.py"}]}
        return thinking_server.json("POST", "/api/chat", body)["prompt_eval_count"]
    assert ollama(True) > ollama(False) + 5


def test_reasoning_before_the_last_user_turn_is_dropped_as_the_template_says(thinking_server):
    def turns(reasoning: bool) -> list[dict]:
        return [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello.", **({"reasoning_content": REASONING_1} if reasoning else {})},
                {"role": "user", "content": "Bye"}]
    prompts = [thinking_server.json("POST", "/apply-template", {"messages": turns(r)})["prompt"] for r in (False, True)]
    assert prompts[0] == prompts[1] and REASONING_1 not in prompts[1]


def test_reasoning_that_is_not_a_string_is_a_400(thinking_server):
    body = thinking_server.json("POST", "/v1/chat/completions", {"max_tokens": 1, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "reasoning_content": 5},
        {"role": "user", "content": "Bye"}]}, expect=400)
    assert "messages[1].reasoning_content" in body["error"]["message"]
