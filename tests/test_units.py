"""Unit tests of the pure parts: text assembly, token buffers, request parsing."""

from __future__ import annotations

import os
import threading

import pytest

from koboldlite.errors import RequestError
from koboldlite.text import TextAssembler
from koboldlite.fields import FieldReader
from koboldlite.generation import GenerationRequest, parse_sampler_settings
from koboldlite.jobs import StopReason, TokenBuffer
from koboldlite.engine.gguf_layout import GGUFLayout, fit_gpu_layers
from koboldlite.chat.template import ChatTemplate


def feed_all(asm: TextAssembler, chunks: list[bytes]) -> list[str]:
    return [asm.feed(c) for c in chunks]


def test_utf8_split_across_tokens_is_never_emitted_half():
    data = "é🎉日".encode()
    asm = TextAssembler()
    out = feed_all(asm, [bytes([b]) for b in data])
    assert "".join(out) + asm.flush() == "é🎉日"
    assert all("\ufffd" not in piece for piece in out)
    assert out[0] == "" and out[1] == "é"


def test_stop_string_is_held_back_then_trimmed():
    asm = TextAssembler(["\nUser:"])
    out = feed_all(asm, [b"Hello", b"\n", b"Us", b"er", b":", b" more"])
    assert out[:2] == ["Hello", ""]          # the newline might start the stop string: held back
    assert "".join(out) == "Hello" and asm.stopped_by == "\nUser:"
    assert asm.flush() == ""


def test_stop_string_kept_when_not_trimmed():
    asm = TextAssembler(["END"], trim_stop=False)
    assert "".join(feed_all(asm, [b"the E", b"ND of it"])) == "the END"


def test_false_alarm_is_released():
    asm = TextAssembler(["\nUser:"])
    out = feed_all(asm, [b"a\n", b"Usb"])
    assert "".join(out) == "a\nUsb"
    assert asm.stopped_by is None


def test_held_back_text_is_flushed_at_the_end():
    asm = TextAssembler(["STOP"])
    assert asm.feed(b"go ST") == "go "
    assert asm.flush() == "ST"


def test_earliest_of_several_stop_strings_wins():
    asm = TextAssembler(["bb", "a b"])
    assert asm.feed(b"xa bb") == "x"


def test_token_buffer_readers_wait_for_pieces():
    buf = TokenBuffer()
    got = []

    def reader():
        index = 0
        while True:
            new, done = buf.read(index)           # waits until there is more, or the buffer is done
            got.extend(new)
            index += len(new)
            if done and not new:
                return
    t = threading.Thread(target=reader)
    t.start()
    for p in ("a", "b", "c"):
        buf.append(p)
    buf.close(StopReason.END)
    t.join(10)
    assert not t.is_alive() and got == ["a", "b", "c"] and buf.text() == "abc" and buf.stop_reason is StopReason.END
    buf.close(StopReason.LENGTH)              # the first reason stands
    assert buf.stop_reason is StopReason.END


def test_field_reader_types():
    f = FieldReader({"a": 1, "b": 2.0, "c": "x", "d": True, "e": None, "f": ["s"], "g": "1, 2"})
    assert f.integer("b", default=0) == 2
    assert f.number("a", default=0) == 1.0
    assert f.integer("e", default=7) == 7
    assert f.string_list("c") == ["x"] and f.string_list("f") == ["s"]
    assert f.token_ids("g") == [1, 2]
    assert f.integer("a", default=0, lo=5) == 5
    for bad in (lambda: f.integer("c", default=0), lambda: f.number("d", default=0),
                lambda: f.boolean("a"), lambda: f.string("a")):
        with pytest.raises(RequestError):
            bad()
    with pytest.raises(RequestError):
        FieldReader([1, 2])


def test_sampler_aliases_and_defaults():
    s = parse_sampler_settings(FieldReader({"repetition_penalty": 1.2, "sampler_seed": 5,
                                            "logit_bias": {"7": -3}}))
    assert s.rep_pen == 1.2 and s.seed == 5 and s.logit_bias == {7: -3.0}
    assert parse_sampler_settings(FieldReader({})).top_k == 100
    assert GenerationRequest(prompt="x").trim_stop is True


@pytest.mark.parametrize("use_epoll", [True, False])
def test_hangup_watcher_sees_a_peer_leave(use_epoll):
    """Both the epoll watcher (Linux) and the select fallback (Windows, macOS) fire on a hang-up."""
    import socket
    from koboldlite.web.connections import HangupWatcher
    watcher = HangupWatcher(use_epoll=use_epoll)
    server_side, client_side = socket.socketpair()
    server_side.settimeout(30)            # as connections are: non-blocking underneath
    gone = threading.Event()
    watcher.watch(server_side, gone.set)
    assert not gone.wait(0.05)            # still connected: nothing fires
    client_side.close()
    assert gone.wait(10)
    watcher.unwatch(server_side)
    server_side.close()


@pytest.mark.parametrize("use_epoll", [True, False])
def test_a_hangup_seen_late_cancels_nothing_on_a_new_connection_with_the_same_descriptor(use_epoll):
    """A hang-up reported for one connection that then ends another way before the watcher acts on it, while a new
    connection is given the same descriptor number and watched: the new client's job is not cancelled (under load
    this answered a stream with no text), and its own hang-up still is seen."""
    import os
    import socket
    from koboldlite.web.connections import HangupWatcher
    acted, new_gone, old_gone = threading.Event(), threading.Event(), threading.Event()
    new_client = []

    class EndsMeanwhile(HangupWatcher):
        def _fire(self, fd, sock):
            if acted.is_set():
                return super()._fire(fd, sock)
            # Between the wait and this call: the old connection is done with, and the number goes to a new one.
            self.unwatch(sock)
            sock.detach()
            server_side, client_side = socket.socketpair()
            os.dup2(server_side.fileno(), fd)
            server_side.close()
            new_client.append(client_side)
            self.watch(socket.socket(fileno=fd), new_gone.set)
            super()._fire(fd, sock)              # the event seen for the old connection
            acted.set()

    watcher = EndsMeanwhile(use_epoll=use_epoll)
    server_side, client_side = socket.socketpair()
    watcher.watch(server_side, old_gone.set)
    client_side.close()
    assert acted.wait(10)
    assert not new_gone.is_set() and not old_gone.is_set()
    new_client[0].close()
    assert new_gone.wait(10)


class NoSpecialTokens:
    """Enough of a model for a chat template that names no end-of-turn marker."""
    bos = eos = -1

    def tokenize(self, text, parse_special=True):
        return []


@pytest.mark.parametrize("source, messages, expected", [
    # transformers' loopcontrols extension
    ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}"
     "{% continue %}{% endif %}[{{ m.content }}]{% endfor %}",
     [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "[a]"),
    # a tojson that leaves HTML and non-ASCII alone, with transformers' keyword arguments
    ("{{ messages[0] | tojson }}|{{ messages[0].content | tojson(indent=2) }}",
     [{"role": "user", "content": "<b>é & 'q'</b>"}], '{"role": "user", "content": "<b>é & \'q\'</b>"}|"<b>é & \'q\'</b>"'),
    # the {% generation %} tag renders its body
    ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}<{{ m.content }}>{% endgeneration %}"
     "{% else %}{{ m.content }}{% endif %}{% endfor %}",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "hi<yo>"),
])
def test_chat_templates_render_as_transformers_does(source, messages, expected):
    template = ChatTemplate(source, "test", NoSpecialTokens())
    assert template.render(messages, add_generation_prompt=False) == expected


# -- GPU offload arithmetic (issue 23) ---------------------------------------------------------------------

def test_gguf_layout_and_the_layer_fit(starter_model):
    layout = GGUFLayout(starter_model)
    assert layout.n_layer == 30 and sorted(layout.layer_bytes) == list(range(30)) and layout.n_vocab == 49152
    on_file = sum(layout.layer_bytes.values()) + layout.other_bytes
    assert 0.9 < on_file / os.path.getsize(starter_model) <= 1.0
    assert layout.kv_width == 3 * 64 * 2         # SmolLM2-135M: 3 KV heads of 64, keys and values
    assert fit_gpu_layers(layout, 8 << 30, 4096, 0, 512)[0] == 31        # all, and the output layer
    assert fit_gpu_layers(layout, 100 << 20, 4096, 0, 512)[0] == 0       # not even the margin
    counts = [fit_gpu_layers(layout, mib << 20, 4096, 0, 512)[0] for mib in range(600, 760, 8)]
    assert counts == sorted(counts) and 0 < counts[len(counts) // 2] < 31          # more memory, more layers
    n, fit = fit_gpu_layers(layout, 680 << 20, 4096, 0, 512)
    kv = 4096 * layout.kv_width * 2
    assert fit["planned_mib"] == (sum(layout.layer_bytes[i] for i in range(30 - n, 30)) + n * kv) >> 20
    smaller_kv = fit_gpu_layers(layout, 680 << 20, 4096, 2, 512)[0]       # q4_0 cache: more fit
    assert smaller_kv >= n
