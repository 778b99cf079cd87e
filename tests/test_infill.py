"""Fill in the middle: llama-server's /infill, OpenAI completions' `suffix`, Ollama generate's `suffix`.

The starter model declares no FIM tokens, so these tests run on a copy of it whose GGUF names five of its rare
special tokens as FIM tokens (tests/fim_model.py). The model was never trained on them: what it writes in the
middle is nonsense, and nothing here judges it. What is checked is the plumbing: the prompt laid out token by token
as llama-server lays it out (the answer's `prompt`, the special tokens written as their text, and its token count),
the answers' shapes in each API, streamed and whole, and the 400s.
"""

from __future__ import annotations

import json

import pytest

from tests.fim_model import make_fim_model
from tests.harness import SSEStream, ServerProcess, openai_client_for

PASSWORD = "fim-secret"
AUTH = {"Authorization": f"Bearer {PASSWORD}"}
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return c\n"
GREEDY = {"temperature": 0, "seed": 7}


@pytest.fixture(scope="module")
def fim_model(starter_model, tmp_path_factory) -> tuple[str, dict[str, int]]:
    """(path, {"fim_pre": id, ..., "bos": id}) of the starter model's copy with FIM tokens."""
    import gguf
    path = str(tmp_path_factory.mktemp("fim") / "fim-smollm2.gguf")
    roles = make_fim_model(starter_model, path)
    roles["bos"] = int(gguf.GGUFReader(path).fields["tokenizer.ggml.bos_token_id"].contents())
    return path, roles


@pytest.fixture(scope="module")
def fim_server(fim_model):
    s = ServerProcess(["--model", fim_model[0], "--contextsize", "1024", "--password", PASSWORD])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def t(fim_model):
    return fim_model[1]


def post(server, path: str, body, expect: int = 200) -> dict:
    return server.json("POST", path, body, headers=AUTH, expect=expect)


def tokens(server, text: str, special: bool = False) -> list[int]:
    """The server's tokens of `text`, with no BOS (the model's own tokenizer, through llama-server's /tokenize)."""
    return post(server, "/tokenize", {"content": text, "parse_special": special})["tokens"]


def shown(server, ids: list[int]) -> list[str]:
    """Each token's text, special tokens as their text (as the answer's `prompt` writes them)."""
    return [post(server, "/detokenize", {"tokens": [i]})["content"] for i in ids]


def assert_prompt_is(server, answer: dict, expected: list[int]):
    """The answer's prompt is `expected`, token by token: as many tokens, and each one's text in its place."""
    assert answer["tokens_evaluated"] == len(expected)
    pieces, at = shown(server, expected), 0
    for position, piece in enumerate(pieces):
        assert answer["prompt"][at:at + len(piece)] == piece, (position, piece, answer["prompt"][at:])
        at += len(piece)
    assert at == len(answer["prompt"])


def layout(server, t: dict, prefix: str, suffix: str, prompt: str = "", extra=()) -> list[int]:
    """llama-server's format_prompt_infill, written out for this model (FIM_REP and FIM_SEP present, BOS added)."""
    head = [t["fim_rep"]] + tokens(server, "myproject\n")
    for filename, text in extra:
        head += [t["fim_sep"]] + tokens(server, filename + "\n") + tokens(server, text)
    head += [t["fim_sep"]] + tokens(server, "filename\n")
    return (head + [t["bos"], t["fim_pre"]] + tokens(server, prefix) + tokens(server, prompt, special=True)
            + [t["fim_suf"]] + tokens(server, suffix) + [t["fim_mid"]])


# -- /infill ----------------------------------------------------------------------------

def test_infill_lays_out_extra_files_prefix_prompt_and_suffix(fim_server, t):
    extra = [("util.py", "def helper():\n    return 1\n"), ("main.py", "import util\n")]
    answer = post(fim_server, "/infill", {
        "input_extra": [{"filename": name, "text": text} for name, text in extra],
        "input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "c = a +", "n_predict": 6, **GREEDY})
    assert_prompt_is(fim_server, answer, layout(fim_server, t, PREFIX, SUFFIX, "c = a +", extra))
    assert answer["stop"] is True and answer["tokens_predicted"] <= 6
    assert answer["stop_type"] in ("eos", "limit", "word") and answer["model"] == "fim-smollm2"
    assert answer["timings"]["prompt_n"] + answer["timings"]["cache_n"] == answer["tokens_evaluated"]
    assert answer["has_new_line"] == ("\n" in answer["content"])


def test_infill_reads_special_tokens_in_prompt_but_not_in_prefix_and_suffix(fim_server, t):
    """llama-server tokenizes input_prefix and input_suffix as plain text, and `prompt` with its special tokens."""
    text = "x<jupyter_code>y"
    answer = post(fim_server, "/infill", {"input_prefix": text, "input_suffix": text, "prompt": text,
                                          "n_predict": 1})
    assert t["fim_mid"] in tokens(fim_server, text, special=True)
    assert t["fim_mid"] not in tokens(fim_server, text)
    assert_prompt_is(fim_server, answer, layout(fim_server, t, text, text, text))


def test_infill_takes_llama_servers_mixed_lists_of_text_and_token_ids(fim_server, t):
    answer = post(fim_server, "/infill", {"input_prefix": ["def f", 42, "():"], "input_suffix": [7],
                                          "n_predict": 1})
    expected = layout(fim_server, t, "", "")
    pre, suf = expected.index(t["fim_pre"]), expected.index(t["fim_suf"])
    expected[pre + 1:suf] = tokens(fim_server, "def f") + [42] + tokens(fim_server, "():")
    expected[-1:-1] = [7]
    assert_prompt_is(fim_server, answer, expected)


def test_infill_keeps_the_end_of_a_long_prefix_and_the_start_of_a_long_suffix(fim_server, t):
    """A batch of 512: the prefix keeps its last 384 tokens, the suffix its first 128 less 2 and the prompt's."""
    prefix = "".join(f"value_{i} = {i}\n" for i in range(120))
    suffix = "".join(f"print(value_{i})\n" for i in range(80))
    prompt = "total ="
    answer = post(fim_server, "/infill", {"input_prefix": prefix, "input_suffix": suffix, "prompt": prompt,
                                          "n_predict": 1})
    kept_prefix = tokens(fim_server, prefix)[-384:]
    kept_suffix = tokens(fim_server, suffix)[:128 - 2 - len(tokens(fim_server, prompt, special=True))]
    assert len(tokens(fim_server, prefix)) > 384 and len(tokens(fim_server, suffix)) > len(kept_suffix)
    expected = layout(fim_server, t, "", "", prompt)
    pre = expected.index(t["fim_pre"])
    expected[pre + 1:pre + 1] = kept_prefix
    expected[-1:-1] = kept_suffix
    assert_prompt_is(fim_server, answer, expected)


def test_infill_streams_llama_servers_completion_chunks(fim_server, t):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, **GREEDY}
    whole = post(fim_server, "/infill", body)
    stream = SSEStream(fim_server, "/infill", {**body, "stream": True}, headers=AUTH)
    assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
    chunks = []
    for event in stream.events():
        assert event.startswith(b"data: ")
        chunks.append(json.loads(event[len(b"data: "):]))
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]     # no [DONE]: not OpenAI's stream
    final = chunks[-1]
    assert final["content"] == "" and "timings" in final
    assert "".join(c["content"] for c in chunks) == whole["content"]
    assert_prompt_is(fim_server, final, layout(fim_server, t, PREFIX, SUFFIX))


@pytest.mark.parametrize("body, words", [
    ({"input_suffix": ""}, '"input_prefix" is required'),
    ({"input_prefix": ""}, '"input_suffix" is required'),
    ({"input_prefix": 42, "input_suffix": ""}, "'input_prefix' must be a string"),
    ({"input_prefix": "", "input_suffix": {"text": "x"}}, "'input_suffix' must be a string"),
    ({"input_prefix": [1.5], "input_suffix": ""}, "list of strings and token ids"),
    ({"input_prefix": [10 ** 7], "input_suffix": ""}, "list of strings and token ids"),
    ({"input_prefix": "", "input_suffix": "", "prompt": 7}, '"prompt" must be a string'),
    ({"input_prefix": "", "input_suffix": "", "input_extra": {}}, '"input_extra" must be an array'),
    ({"input_prefix": "", "input_suffix": "", "input_extra": ["text"]}, 'must contain a "text" field'),
    ({"input_prefix": "", "input_suffix": "", "input_extra": [{}]}, 'must contain a "text" field'),
    ({"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": "ok"}]}, 'must contain a "text" field'),
    ({"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": 123, "text": "abc"}]},
     '"filename" field must be a string'),
    ({"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": 123, "text": 456}]},
     'must contain a "text" field'),
])
def test_infill_bad_input_is_a_400_and_the_server_keeps_serving(fim_server, body, words):
    error = post(fim_server, "/infill", body, expect=400)["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert post(fim_server, "/infill", {"input_prefix": "a", "input_suffix": "b", "n_predict": 1})["stop"] is True


def test_infill_names_the_fields_it_does_not_act_on(fim_server):
    status, headers, data = fim_server.request("POST", "/infill", {
        "input_prefix": "a", "input_suffix": "b", "n_predict": 1, "n_probs": 3, "cache_prompt": False,
        "id_slot": -1, "temperature": 0.5}, headers=AUTH)
    assert status == 200, data
    assert headers["x-koboldlite-ignored"].split(",") == ["n_probs", "cache_prompt"]


def test_infill_needs_the_password(fim_server):
    status, _, data = fim_server.request("POST", "/infill", {"input_prefix": "a", "input_suffix": "b"})
    assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"



def test_infill_honours_per_request_lora_scales(fim_model, starter_model, tmp_path):
    """/infill reads llama-server's `lora` as completions do: scale 0 is the adapter-free middle, 1 another."""
    from tests.make_lora import make_lora
    adapter = make_lora(str(tmp_path / "lora.gguf"), starter_model)   # the FIM copy has the same tensors
    s = ServerProcess(["--model", fim_model[0], "--contextsize", "1024", "--lora", f"{adapter}:0"])
    try:
        def middle(scale):
            status, headers, data = s.request("POST", "/infill", {
                "input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 16, "ignore_eos": True, **GREEDY,
                "lora": [{"id": 0, "scale": scale}]})
            assert status == 200 and "lora" not in headers.get("x-koboldlite-ignored", ""), data
            return json.loads(data)["content"]
        unadapted = middle(0)
        assert middle(1) != unadapted and middle(0) == unadapted
    finally:
        s.stop()


# -- OpenAI completions' suffix and Ollama generate's suffix -----------------------------

def test_openai_suffix_is_the_infill_layout(fim_server, t):
    client = openai_client_for(fim_server, api_key=PASSWORD)
    r = client.completions.create(model="x", prompt=PREFIX, suffix=SUFFIX, max_tokens=8, **GREEDY)
    same = post(fim_server, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, **GREEDY})
    assert r.usage.prompt_tokens == same["tokens_evaluated"] == len(layout(fim_server, t, PREFIX, SUFFIX))
    assert_prompt_is(fim_server, same, layout(fim_server, t, PREFIX, SUFFIX))
    assert r.choices[0].text == same["content"]          # greedy: the same prompt gives the same middle
    streamed = client.completions.create(model="x", prompt=PREFIX, suffix=SUFFIX, max_tokens=8, stream=True,
                                         **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_ollama_suffix_is_the_infill_layout(fim_server, t):
    import ollama
    client = ollama.Client(host=fim_server.base, headers=AUTH)
    options = {"num_predict": 8, "repeat_penalty": 1.0, **GREEDY}
    r = client.generate(model="x", prompt=PREFIX, suffix=SUFFIX, options=options)
    same = post(fim_server, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8, **GREEDY})
    assert r.prompt_eval_count == len(layout(fim_server, t, PREFIX, SUFFIX)) == same["tokens_evaluated"]
    assert r.response == same["content"]
    streamed = client.generate(model="x", prompt=PREFIX, suffix=SUFFIX, options=options, stream=True)
    assert "".join(part.response for part in streamed) == r.response
    status, headers, _ = fim_server.request("POST", "/api/generate", {
        "model": "x", "prompt": PREFIX, "suffix": SUFFIX, "system": "Be brief.", "stream": False,
        "options": {"num_predict": 1}}, headers=AUTH)
    assert status == 200 and headers["x-koboldlite-ignored"] == "system"


def test_suffix_bad_input_is_a_400_in_each_apis_shape(fim_server):
    error = post(fim_server, "/v1/completions", {"prompt": "a", "suffix": 5}, expect=400)["error"]
    assert "'suffix' must be a string" in error["message"]
    error = post(fim_server, "/v1/completions", {"prompt": {"prompt_string": "a", "multimodal_data": []},
                                                 "suffix": "b"}, expect=400)["error"]
    assert "'prompt' must be a string" in error["message"]
    assert "'suffix' must be a string" in post(fim_server, "/api/generate", {"prompt": "a", "suffix": [1]},
                                               expect=400)["error"]
    assert "'images' cannot go with 'suffix'" in post(fim_server, "/api/generate", {
        "prompt": "a", "suffix": "b", "images": ["aGk="]}, expect=400)["error"]
    r = post(fim_server, "/v1/completions", {"prompt": "a", "suffix": "b", "max_tokens": 1})
    assert r["choices"][0]["finish_reason"] in ("stop", "length")


# -- A model without FIM tokens --------------------------------------------------------

NO_FIM = "Infill is not supported by this model: prefix token is missing. suffix token is missing. middle token"


def test_a_model_without_fim_tokens_gets_a_clear_400_in_each_api(server):
    import openai
    import ollama
    status, _, data = server.request("POST", "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX})
    error = json.loads(data)["error"]
    assert status == 400 and error["message"].startswith(NO_FIM), error
    assert "tokenizer.ggml.fim_pre_token_id" in error["message"] and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client_for(server).completions.create(model="x", prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
    assert NO_FIM in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.base, verify=server.ssl_context()).generate(model="x", prompt=PREFIX,
                                                                              suffix=SUFFIX)
    assert e.value.status_code == 400 and NO_FIM in e.value.error
    # An empty suffix asks for no infill: a plain completion, and the server still serves.
    r = openai_client_for(server).completions.create(model="x", prompt=PREFIX, suffix="", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# -- The layout, in-process, with a small batch and context -----------------------------

@pytest.fixture(scope="module")
def fim_llama(fim_model):
    from koboldlite.engine.llama_model import LlamaModel
    model = LlamaModel(fim_model[0], n_ctx=256, n_seq=1, n_threads=1, n_gpu_layers=0, n_batch=64)
    yield model
    model.close()


def test_layout_trims_prefix_suffix_and_extra_to_the_batch_and_context(fim_llama, t):
    from koboldlite.engine.infill import FimTokens, InfillParts, infill_tokens
    model = fim_llama
    text = lambda s: model.tokenize(s, parse_special=False)      # noqa: E731
    prefix = "".join(f"a{i} = {i}\n" for i in range(40))
    suffix = "".join(f"b{i}\n" for i in range(20))
    extra = [("one.py", "".join(f"c{i} = {i}\n" for i in range(30))), ("two.py", "d = 1\n")]
    fim = FimTokens.of(model)
    assert (fim.pre, fim.suf, fim.mid, fim.rep, fim.sep) == (t["fim_pre"], t["fim_suf"], t["fim_mid"],
                                                             t["fim_rep"], t["fim_sep"])
    got = infill_tokens(model, fim, InfillParts(prefix, suffix, extra, "x ="), n_batch=64, n_predict=16, n_ctx=256)
    all_extra = [t["fim_rep"]] + text("myproject\n")
    for name, body in extra:
        all_extra += [t["fim_sep"]] + text(name + "\n") + text(body)
    all_extra += [t["fim_sep"]] + text("filename\n")
    n_extra = 256 - 64 - 2 * 16                     # what the context leaves beside a batch and twice the reply
    assert len(all_extra) > n_extra and len(text(prefix)) > 48 and len(text(suffix)) > 16
    assert got == (all_extra[-n_extra:] + [t["bos"], t["fim_pre"]] + text(prefix)[-48:] + text("x =")
                   + [t["fim_suf"]] + text(suffix)[:16 - 2 - len(text("x ="))] + [t["fim_mid"]])


def test_layout_without_repo_and_file_tokens_uses_snippet_lines(fim_llama, t):
    from koboldlite.engine.infill import SNIPPET_SEPARATOR, FimTokens, InfillParts, infill_tokens
    model = fim_llama
    text = lambda s: model.tokenize(s, parse_special=False)      # noqa: E731
    fim = FimTokens(t["fim_pre"], t["fim_suf"], t["fim_mid"], rep=None, sep=None)
    got = infill_tokens(model, fim, InfillParts("p", "s", [("x.py", "x = 1\n")]), n_batch=512, n_predict=-1,
                        n_ctx=4096)
    assert got == (text(SNIPPET_SEPARATOR) + text("x = 1\n") + [t["bos"], t["fim_pre"]] + text("p")
                   + [t["fim_suf"]] + text("s") + [t["fim_mid"]])
