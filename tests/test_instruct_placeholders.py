"""KoboldCpp's instruct placeholders ({{[INPUT]}}, {{[OUTPUT]}}, {{[SYSTEM]}}) in text prompts and stop sequences,
rendered with the model's chat template as KoboldCpp 1.102 does. All on real models."""

from __future__ import annotations

import pytest

from tests.harness import ServerProcess

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
LITE = "{{[INPUT]}}Write one sentence about the sea.{{[OUTPUT]}}"
LITE_STOPS = ["{{[INPUT]}}", "{{[OUTPUT]}}"]


def kobold_text(server, **body) -> str:
    return server.json("POST", "/api/v1/generate", body)["results"][0]["text"]


def chat_text(server, messages, **body) -> str:
    r = server.json("POST", "/v1/chat/completions", {"messages": messages, "temperature": 0, **body})
    return r["choices"][0]["message"]["content"]


# -- instruct placeholders -----------------------------------------------------------------------

@pytest.mark.parametrize("prompt, messages", [
    (LITE, [{"role": "user", "content": "Write one sentence about the sea."}]),
    ("{{[INPUT]}}Write one sentence about the sea.{{[INPUT_END]}}{{[OUTPUT]}}",
     [{"role": "user", "content": "Write one sentence about the sea."}]),
    ("{{[SYSTEM]}}You are terse.{{[SYSTEM_END]}}\n{{[INPUT]}}\nName three colours.\n{{[INPUT_END]}}\n{{[OUTPUT]}}", CHAT),
    ("{{[SYSTEM]}}You are terse.{{[INPUT]}}Hi.{{[OUTPUT]}}Hello.{{[INPUT]}}Name three colours.{{[OUTPUT]}}",
     [CHAT[0], {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}, CHAT[1]]),
])
def test_placeholder_prompt_reads_as_the_chat_api_renders_it(server, prompt, messages):
    want = chat_text(server, messages, max_tokens=30)
    chat_prompt_tokens = server.json("GET", "/api/extra/perf")["last_input_count"]
    got = kobold_text(server, prompt=prompt, max_length=30, temperature=0, stop_sequence=LITE_STOPS)
    assert server.json("GET", "/api/extra/perf")["last_input_count"] == chat_prompt_tokens
    assert got == want and got
    completion = server.json("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 30, "temperature": 0,
                                                         "stop": LITE_STOPS})
    assert completion["choices"][0]["text"] == want
    assert completion["usage"]["prompt_tokens"] == chat_prompt_tokens


def test_text_before_the_first_placeholder_and_memory_stay_in_front(server):
    rendered = server.json("POST", "/apply-template", {"messages": [{"role": "user", "content": "Go on."}]})["prompt"]
    kobold_text(server, prompt="{{[INPUT]}}Go on.{{[OUTPUT]}}", memory="[World: a cold sea.]\n", max_length=1,
                temperature=0)
    expected = server.json("POST", "/tokenize", {"content": "[World: a cold sea.]\n" + rendered})["tokens"]
    assert server.json("GET", "/api/extra/perf")["last_input_count"] == len(expected)
    # The reply may be begun after the last {{[OUTPUT]}}.
    begun = kobold_text(server, prompt="{{[INPUT]}}Name a colour.{{[OUTPUT]}}My answer is", max_length=1,
                        temperature=0)
    expected = server.json("POST", "/tokenize", {"content": server.json(
        "POST", "/apply-template", {"messages": [{"role": "user", "content": "Name a colour."}]})["prompt"]
        + "My answer is"})["tokens"]
    assert server.json("GET", "/api/extra/perf")["last_input_count"] == len(expected) and begun is not None


def test_placeholders_stay_literal_when_asked(server):
    kobold_text(server, prompt=LITE, max_length=1, replace_instruct_placeholders=False)
    literal = server.json("POST", "/tokenize", {"content": LITE})["tokens"]
    assert server.json("GET", "/api/extra/perf")["last_input_count"] == len(literal)


QA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}\nQ: {% else %}\nA: {% endif %}"
               "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}\nA:{% endif %}")
FEW_SHOT = ("{{[INPUT]}}What is 1+1?{{[OUTPUT]}}2{{[INPUT]}}What is 2+2?{{[OUTPUT]}}4"
            "{{[INPUT]}}What is 3+3?{{[OUTPUT]}}")


def test_placeholder_stop_sequence_stops_where_the_template_starts_a_turn(make_server, tmp_path):
    template = tmp_path / "qa.jinja"
    template.write_text(QA_TEMPLATE)
    s = make_server("--chat-template", str(template), tls=False)
    body = {"prompt": FEW_SHOT, "max_length": 40, "temperature": 0, "ban_eos_token": True}
    free = kobold_text(s, **body)
    assert "Q:" in free           # left alone, the model writes the next question itself
    stopped = s.json("POST", "/api/v1/generate", {**body, "stop_sequence": LITE_STOPS})["results"][0]
    assert stopped["finish_reason"] == "stop" and "Q:" not in stopped["text"]
    assert free.startswith(stopped["text"]) and s.json("GET", "/api/extra/perf")["stop_reason"] == 2


def test_placeholder_stops_map_to_the_real_templates_turn_starts(starter_model):
    from koboldlite.config import BUILTIN_CHAT_TEMPLATES
    from koboldlite.engine.llama_model import LlamaModel
    from koboldlite.chat.template import ChatTemplate, load_chat_template
    model = LlamaModel(starter_model, n_ctx=256, n_seq=1, n_threads=1, n_gpu_layers=0)
    template, _ = load_chat_template(model, None)
    assert template.instruct_stops(LITE_STOPS + ["{{[INPUT_END]}}", "plain"]) == \
        ["<|im_start|>user", "<|im_start|>assistant", "<|im_end|>", "plain"]
    gemma = ChatTemplate(BUILTIN_CHAT_TEMPLATES["gemma"], "gemma", model)
    assert gemma.instruct_stops(LITE_STOPS) == ["<start_of_turn>user", "<start_of_turn>model"]


def test_placeholders_on_gemma_with_its_own_template(gemma_model):
    s = ServerProcess(["--model", gemma_model, "--contextsize", "512", "--chat-template", "gemma"])
    try:
        for prompt, messages in ((LITE, [{"role": "user", "content": "Write one sentence about the sea."}]),
                                 ("{{[SYSTEM]}}You are terse.{{[SYSTEM_END]}}{{[INPUT]}}Name three colours."
                                  "{{[INPUT_END]}}{{[OUTPUT]}}", CHAT)):
            want = chat_text(s, messages, max_tokens=12)
            n = s.json("GET", "/api/extra/perf")["last_input_count"]
            assert kobold_text(s, prompt=prompt, max_length=12, temperature=0, stop_sequence=LITE_STOPS) == want
            assert s.json("GET", "/api/extra/perf")["last_input_count"] == n
    finally:
        s.stop()
