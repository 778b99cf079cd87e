"""The built-in page's rendered replies (issue 38), in a real headless Chromium: markdown, code blocks with copy,
thinking folded, takes and branches kept across a reload and through export and import, per-reply numbers, the
length cut with continue, prompt reading progress, and hostile replies that run and load nothing. The starter
model will not write tables or hostile markup on demand, so some tests feed the page a fixed stream (Playwright's
request routing stands in for /v1/chat/completions); the others talk to the real server."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import pytest

from tests.harness import ServerProcess
from tests.test_ui import browser, page, settings, shot, ui_server, wait_reply_done  # noqa: F401  (fixtures)

CHAT = "**/v1/chat/completions"


def stream_body(content: str, reasoning: str = "", finish: str = "stop", usage: dict | None = None,
                timings: dict | None = None) -> str:
    """An OpenAI chat stream as the server sends it, the text cut in small pieces (markdown arrives unfinished),
    with the usage and timings the server would give (a piece a token, 25 tokens a second) unless given."""
    def delta(d):
        return {"choices": [{"index": 0, "delta": d, "finish_reason": None}]}
    chunks = [delta({"role": "assistant", "content": ""})]
    chunks += [delta({"reasoning_content": reasoning[i:i + 7]}) for i in range(0, len(reasoning), 7)]
    chunks += [delta({"content": content[i:i + 7]}) for i in range(0, len(content), 7)]
    tokens = len(chunks) - 1
    usage = usage or {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    timings = timings or {"prompt_n": 12, "prompt_ms": 40.0, "predicted_n": tokens, "predicted_ms": 40.0 * tokens,
                          "predicted_per_second": 25.0}
    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    if timings:
        last["timings"] = timings
    chunks.append(last)
    if usage:
        chunks.append({"choices": [], "usage": usage})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def feed(page, *replies: str, **fields) -> list[dict]:
    """Answers the page's chat requests with `replies` in turn (the last again once they run out); returns the
    request bodies as they come."""
    bodies = []

    def answer(route):
        bodies.append(json.loads(route.request.post_data))
        text = replies[min(len(bodies), len(replies)) - 1]
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=stream_body(text, **fields))
    page.route(CHAT, answer)
    return bodies


def ask(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_reply_done(page)


CODE = 'def greet(name):\n    return f"Hello, {name}!"'
MARKDOWN = f"""## Three colours

| Colour | Hex |
|---|---|
| Red | #ff0000 |
| Green | #00ff00 |

- **bold** item
- *second* item
- `inline` item
- [x] done
- [ ] to do

1. one
2. two

> a quote

```python
{CODE}
```

See [the docs](https://example.com/docs).
"""


def test_markdown_table_list_and_code_with_copy(page, ui_server):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=ui_server.base)
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(ui_server.base) else None)
    feed(page, MARKDOWN)
    page.goto(ui_server.base)
    ask(page, "Show me some markdown.")
    reply = page.locator(".msg.assistant .text")
    assert reply.locator("h2").inner_text() == "Three colours"
    assert reply.locator("table th").all_inner_texts() == ["Colour", "Hex"]
    assert reply.locator("table td").count() == 4
    assert reply.locator("ul > li").count() == 5 and reply.locator("ol > li").count() == 2
    assert reply.locator("ul > li").all_inner_texts()[3:] == ["☑ done", "☐ to do"]
    assert reply.locator("strong").inner_text() == "bold" and reply.locator("em").inner_text() == "second"
    assert reply.locator("blockquote").inner_text() == "a quote"
    code = reply.locator("pre code.language-python")
    assert code.inner_text() == CODE
    assert code.locator(".hljs-keyword").count() >= 2                   # def, return: coloured
    assert reply.locator("pre .code-head .lang").inner_text() == "python"
    link = reply.locator("a:has-text('the docs')")
    assert link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("target") == "_blank" and link.get_attribute("rel") == "noopener noreferrer"
    reply.locator("pre .code-head .copy").click()
    page.wait_for_selector(".code-head .copy:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    shot(page, "markdown")
    assert outside == []


def test_plain_text_when_markdown_is_off(page, ui_server):
    settings(page, markdown=False)
    feed(page, MARKDOWN)
    page.goto(ui_server.base)
    ask(page, "Show me some markdown.")
    assert page.inner_text(".msg.assistant .text") == MARKDOWN
    assert page.locator(".msg.assistant table, .msg.assistant pre").count() == 0


HOSTILE = "\n\n".join([
    '<img src=x onerror="alert(1)">',
    "<script>alert(2)</script>",
    "[click me](javascript:alert(3))",
    "![tracker](http://tracker.example/pixel.png)",
    '<a href="javascript:alert(4)">raw link</a>',
    '<svg onload="alert(5)"></svg>',
    '<iframe src="http://frame.example/"></iframe>',
    "[data link](data:text/html;base64,PHNjcmlwdD5hbGVydCg2KTwvc2NyaXB0Pg==)",
    "<style>body { display: none }</style>",
    '<details open ontoggle="alert(7)">x</details>',
    '[titled](https://example.com/ "a\\" onmouseover=\\"alert(8)")',
    "<javascript:alert(9)>",
    "Inline <b onclick=alert(10)>bold</b> and `<img src=y onerror=alert(11)>` in code.",
])


def test_a_hostile_reply_runs_nothing_and_loads_nothing(page, ui_server):
    dialogs, errors, outside = [], [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: outside.append(r.url) if urlsplit(r.url).netloc != urlsplit(ui_server.base).netloc
            else None)
    feed(page, HOSTILE)
    page.goto(ui_server.base)
    ask(page, "Be nasty.")
    reply = page.locator(".msg.assistant .text")
    text = reply.inner_text()
    assert '<img src=x onerror="alert(1)">' in text and "<script>alert(2)</script>" in text     # shown, as text
    for tag in ("img", "script", "svg", "iframe", "style", "details", "b", "object", "embed"):
        assert reply.locator(tag).count() == 0, tag
    handlers = page.evaluate("""() => [...document.querySelectorAll('#messages *')].flatMap(
        (e) => [...e.attributes].map((a) => a.name).filter((n) => n.startsWith('on') || n === 'style'))""")
    assert handlers == []
    links = reply.locator("a[href]")
    hrefs = links.evaluate_all("as => as.map((a) => [a.getAttribute('href'), a.target, a.rel])")
    assert hrefs and all(re.match(r"https?:", h) and t == "_blank" and r == "noopener noreferrer" for h, t, r in hrefs)
    assert ["http://tracker.example/pixel.png", "_blank", "noopener noreferrer"] in [list(x) for x in hrefs]
    assert reply.locator("a:has-text('image: tracker')").count() == 1      # a link to follow, not a picture
    for label in ("click me", "raw link", "data link"):                    # kept as words, with no address
        reply.locator(f"text={label}").first.click()
    reply.locator("a:has-text('titled')").hover()
    page.wait_for_load_state("networkidle")
    resources = page.evaluate("performance.getEntriesByType('resource').map((r) => r.name)")
    assert all(r.startswith(ui_server.base) for r in resources), resources
    assert dialogs == [] and errors == [] and outside == [], (dialogs, errors, outside)
    shot(page, "hostile")


def test_content_security_policy(page, ui_server):
    """The header forbids inline scripts and other origins; the browser enforces it on the page."""
    _, headers, _ = ui_server.request("GET", "/")
    policy = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
    for directive in ("default-src", "script-src", "style-src", "connect-src"):
        assert policy[directive] == "'self'", directive
    assert policy["object-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    page.goto(ui_server.base)
    page.wait_for_selector("#status-text:has-text('Ready')")
    blocked = page.evaluate("""async () => {
        const seen = [];
        document.addEventListener('securitypolicyviolation', (e) => seen.push(e.effectiveDirective));
        const s = document.createElement('script');
        s.textContent = 'window.inlineRan = 1';
        document.body.append(s);
        const holder = document.createElement('div');
        holder.innerHTML = '<img src="data:," onerror="window.handlerRan = 1">';
        document.body.append(holder);
        let fetched = true;
        try { await fetch('http://other.example/'); } catch { fetched = false; }
        await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve)));
        return { seen, inline: window.inlineRan, handler: window.handlerRan, fetched };
    }""")
    assert blocked["inline"] is None and blocked["handler"] is None and blocked["fetched"] is False, blocked
    assert {"script-src-elem", "connect-src"} <= set(blocked["seen"]), blocked


REASONING = "Let me think about colours. Red is warm; blue is cold."


def test_thinking_is_folded_above_the_answer(page, ui_server):
    feed(page, "**Red** is my pick.", reasoning=REASONING)
    page.goto(ui_server.base)
    ask(page, "Pick a colour.")
    msg = page.locator(".msg.assistant")
    thinking = msg.locator("details.thinking")
    assert thinking.is_visible() and not thinking.evaluate("d => d.open")
    assert re.fullmatch(rf"Thought( for [\d.]+ s)? \({len(REASONING)} characters\)",
                        thinking.locator("summary").inner_text())
    assert not msg.locator(".reasoning").is_visible()
    assert msg.locator(".text").inner_text() == "Red is my pick." and msg.locator(".text strong").count() == 1
    thinking.locator("summary").click()
    assert msg.locator(".reasoning").inner_text() == REASONING
    shot(page, "thinking-open")
    page.reload()                                                   # kept in the saved conversation, folded
    page.wait_for_selector(".msg.assistant details.thinking:visible")
    assert page.locator(".msg.assistant .reasoning").text_content() == REASONING
    page.click("#open-settings")
    page.uncheck("#s-show_thinking")
    page.click("#settings button:has-text('Done')")
    # The dialog's close event (which applies the settings) comes in a task after the click: wait for it.
    page.locator(".msg.assistant details.thinking").wait_for(state="hidden", timeout=10_000)


def test_numbers_of_a_reply_and_the_length_cut(page, ui_server):
    feed(page, "A reply that was cut", finish="length",
         usage={"prompt_tokens": 20, "completion_tokens": 42, "total_tokens": 62},
         timings={"predicted_n": 42, "predicted_per_second": 18.46, "prompt_n": 20, "prompt_ms": 30.0})
    page.goto(ui_server.base)
    ask(page, "Go on.")
    meta = page.locator(".msg.assistant .meta")
    assert re.fullmatch(r"42 tokens · 18\.5 tokens/s · first token [\d.]+ s", meta.locator(".stats").inner_text())
    assert meta.locator(".cut").inner_text() == "cut at the length limit"
    assert meta.locator("button:has-text('Continue')").is_visible()


def test_takes_and_branches_survive_a_reload_and_travel_in_an_export(browser, ui_server, tmp_path):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()  # noqa: F811
    page.set_default_timeout(60_000)
    bodies = feed(page, "Take 1", "Take 2", "Take 3")
    page.goto(ui_server.base)
    ask(page, "Hello")
    assistant, user = page.locator(".msg.assistant"), page.locator(".msg.user")
    assistant.hover()
    assistant.locator("button:has-text('Regenerate')").click()
    wait_reply_done(page)
    assert assistant.locator(".text").inner_text() == "Take 2" and assistant.locator(".takes .count").inner_text() == "2/2"
    assert bodies[1]["messages"] == [{"role": "user", "content": "Hello"}]       # the earlier take is not sent
    assistant.locator(".takes .prev").click()
    assert assistant.locator(".text").inner_text() == "Take 1" and assistant.locator(".takes .count").inner_text() == "1/2"
    shot(page, "takes")
    user.hover()
    user.locator("button:has-text('Edit')").click()
    page.fill(".msg.user textarea", "Hello again")
    page.click(".msg.user button:has-text('Send')")
    wait_reply_done(page)
    assert bodies[2]["messages"] == [{"role": "user", "content": "Hello again"}]
    assert user.locator(".text").inner_text() == "Hello again" and user.locator(".takes .count").inner_text() == "2/2"
    assert assistant.locator(".text").inner_text() == "Take 3" and assistant.locator(".takes").inner_text() == ""
    page.reload()
    page.wait_for_selector(".msg.user:has-text('Hello again')")
    assert user.locator(".takes .count").inner_text() == "2/2" and assistant.locator(".text").inner_text() == "Take 3"
    user.locator(".takes .prev").click()                    # the first branch, with the take that was shown there
    assert user.locator(".text").inner_text() == "Hello" and assistant.locator(".text").inner_text() == "Take 1"
    assert assistant.locator(".takes .count").inner_text() == "1/2"
    with page.expect_download() as download:
        page.click("#export-chats")
    exported = json.loads(open(download.value.path()).read())
    context.close()
    assert [m["content"] for m in exported[0]["messages"]] == ["Hello", "Take 1"]
    assert sorted(m["content"] for m in exported[0]["others"]) == ["Hello again", "Take 2", "Take 3"]

    fresh = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = fresh.new_page()
        page.goto(ui_server.base)
        exported_file = tmp_path / "export.json"
        exported_file.write_text(json.dumps(exported))
        page.set_input_files("#import-chats", str(exported_file))
        page.click("#conversation-list li:has-text('Hello')")
        page.wait_for_selector(".msg.assistant:has-text('Take 1')")
        page.locator(".msg.assistant .takes .next").click()
        assert page.inner_text(".msg.assistant .text") == "Take 2"
        page.locator(".msg.user .takes .next").click()
        assert page.inner_text(".msg.user .text") == "Hello again" and page.inner_text(".msg.assistant .text") == "Take 3"
    finally:
        fresh.close()


LONG_TABLE = ("| " + " | ".join(f"column {i}" for i in range(12)) + " |\n|" + "---|" * 12 + "\n| "
              + " | ".join(f"value {i}" for i in range(12)) + " |\n\n```js\nconst aVeryLongLine = "
              + "'" + "x" * 200 + "';\n```\n")


def test_rendered_replies_at_phone_width(browser, ui_server):  # noqa: F811
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=2, color_scheme="dark")
    try:
        page = context.new_page()  # noqa: F811
        feed(page, LONG_TABLE + "\n" + MARKDOWN, reasoning=REASONING)
        page.goto(ui_server.base)
        page.fill("#input", "A wide table, please")
        page.tap("#send")
        wait_reply_done(page)
        page.tap(".msg.assistant details.thinking summary")
        assert page.locator(".msg.assistant table").count() == 2
        assert page.evaluate("document.documentElement.scrollWidth") <= 390     # wide parts scroll in place
        shot(page, "phone-markdown")
    finally:
        context.close()


# -- against the real server ------------------------------------------------------------------------------------

def test_a_reader_who_scrolled_up_stays_there(page, ui_server):
    """While the real server streams, the view follows the reply only for a reader at the bottom."""
    earlier = [{"role": "user", "content": "Earlier question"},
               {"role": "assistant", "content": "\n\n".join(f"Paragraph {i}." for i in range(80))}]
    page.add_init_script("localStorage.setItem('kl.conversations', JSON.stringify("
                         + json.dumps([{"id": "long", "title": "Long", "system": "", "messages": earlier}])
                         + ")); localStorage.setItem('kl.current', JSON.stringify('long'));")
    settings(page, max_length=200, ban_eos=True)
    page.goto(ui_server.base)
    page.wait_for_selector(".msg.assistant:has-text('Paragraph 79.')")
    page.fill("#input", "Tell me a long story.")
    page.press("#input", "Enter")
    page.wait_for_function("() => { const e = document.querySelector('.msg.streaming .text');"
                           " return e && e.textContent.length > 10; }")
    box = "document.getElementById('messages')"
    assert page.evaluate(f"{box}.scrollHeight - {box}.scrollTop - {box}.clientHeight") < 40   # followed so far
    page.evaluate(f"{box}.scrollTop = 0")
    grown = page.evaluate("document.querySelector('.msg.streaming .text').textContent.length") + 40
    page.wait_for_function(f"() => document.querySelector('.msg.streaming .text').textContent.length > {grown}")
    assert page.evaluate(f"{box}.scrollTop") == 0
    page.click("#stop")
    wait_reply_done(page)


@pytest.fixture(scope="module")
def small_batch_server(starter_model):
    """Small batches: a long prompt is read in many steps, each reported."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048", "--batchsize", "32"])
    yield s
    s.stop()


def test_prompt_reading_progress_and_numbers_from_the_real_server(page, small_batch_server):
    page.add_init_script("""window.progressSeen = [];
        new MutationObserver(() => {
            const p = document.querySelector('.msg.streaming .progress');
            if (p && !p.hidden && p.textContent) window.progressSeen.push(p.textContent);
        }).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });""")
    settings(page, max_length=16)
    page.goto(small_batch_server.base)
    page.wait_for_selector("#status-text:has-text('Ready')")
    page.click("#system-box summary")
    page.fill("#system-prompt", " ".join(f"Rule {i}: be kind to every visitor." for i in range(40)))
    with page.expect_request(CHAT) as sent:
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
    wait_reply_done(page)
    assert json.loads(sent.value.post_data)["return_progress"] is True
    seen = page.evaluate("window.progressSeen")
    percents = [int(m.group(1)) for m in map(re.compile(r"reading the prompt: (\d+)%").fullmatch, seen) if m]
    assert percents and percents == sorted(percents) and min(percents) < 100, seen
    assert not page.locator(".msg.assistant .progress").is_visible()          # gone once the reply came
    stats = page.inner_text(".msg.assistant .stats")
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · first token [\d.]+ s", stats), stats


def test_continue_after_the_length_cut(page, ui_server):
    settings(page, max_length=10, ban_eos=True)
    page.goto(ui_server.base)
    ask(page, "Write a long story about a dragon.")
    msg = page.locator(".msg.assistant")
    assert msg.locator(".cut").is_visible()
    stored = "JSON.parse(localStorage.getItem('kl.conversations'))[0].messages[1].content"
    before = page.evaluate(stored)
    tokens_before = int(msg.locator(".stats").inner_text().split()[0])
    with page.expect_request("**/api/extra/generate/stream") as sent:
        msg.locator("button:has-text('Continue')").click()
    wait_reply_done(page)
    prompt = json.loads(sent.value.post_data)["prompt"]
    assert prompt == "{{[INPUT]}}Write a long story about a dragon.{{[OUTPUT]}}" + before     # the turn left open
    after = page.evaluate(stored)
    assert after.startswith(before) and len(after) > len(before)
    assert msg.locator(".takes").inner_text() == ""                         # the same reply, not a new take
    assert int(msg.locator(".stats").inner_text().split()[0]) > tokens_before


# A ChatML template that opens the reply's thinking itself (DeepSeek-R1's way): the starter model's whole reply is
# then thinking, streamed by the real server as reasoning_content.
THINKING_CHATML = """{%- for m in messages -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif -%}"""


def test_thinking_streams_from_the_real_server(browser, starter_model, tmp_path):  # noqa: F811
    template = tmp_path / "thinking-chatml.jinja"
    template.write_text(THINKING_CHATML)
    s = ServerProcess(["--model", starter_model, "--contextsize", "1024", "--chat-template", str(template)])
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()  # noqa: F811
        page.set_default_timeout(60_000)
        settings(page, max_length=80, ban_eos=True)
        page.goto(s.base)
        page.fill("#input", "Think about cats.")
        page.press("#input", "Enter")
        page.wait_for_function("""() => {
            const m = document.querySelector('.msg.streaming');
            return m && m.querySelector('.reasoning').textContent.length > 20; }""")
        streaming = page.locator(".msg.streaming")
        assert re.fullmatch(r"Thinking… \(\d+ characters\)", streaming.locator("summary").inner_text())
        assert not streaming.locator(".reasoning").is_visible()                # folded while it runs too
        streaming.locator("summary").click()
        shot(page, "thinking-streaming")
        wait_reply_done(page)
        msg = page.locator(".msg.assistant")
        assert re.fullmatch(r"Thought for [\d.]+ s \(\d+ characters\)", msg.locator("summary").inner_text())
        assert msg.locator(".reasoning").is_visible()                          # left unfolded, as the user did
        assert msg.locator(".text").inner_text() == ""
    finally:
        context.close()
        s.stop()
