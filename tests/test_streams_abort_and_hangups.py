"""One test per incident in shared/seeds: each fails on a server that has the bug."""

from __future__ import annotations

import json

from tests.harness import SSEStream, in_thread, kobold_event_json, result_of

LONG = {"max_length": 1500, "ban_eos_token": True, "temperature": 0.8}


def test_check_and_abort_answer_while_a_tls_stream_runs(server):
    """Seed 000: under TLS, check and abort hung until the generation finished."""
    stream = SSEStream(server, "/api/extra/generate/stream",
                       {"prompt": "Tell me a long story about a dragon.", "genkey": "KCPP-tls-1", **LONG})
    assert stream.status == 200
    first = [kobold_event_json(stream.next_event())["token"] for _ in range(3)]

    check = server.json("POST", "/api/extra/generate/check", {"genkey": "KCPP-tls-1"})
    seen = check["results"][0]["text"]
    assert seen.startswith("".join(first)) and seen, seen

    abort = server.json("POST", "/api/extra/abort", {"genkey": "KCPP-tls-1"})
    assert abort == {"success": "true", "done": "true"}

    events = [kobold_event_json(e) for e in stream.events()]
    assert events[-1]["finish_reason"] == "stop"
    streamed = "".join(first) + "".join(e["token"] for e in events)
    # Had check waited for the end, the abort would have found nothing and all 1500 tokens would be here.
    n = server.json("POST", "/api/extra/tokencount", {"prompt": streamed, "special": False})["value"]
    assert n < 1000, n
    assert streamed.startswith(seen)


def test_two_streams_in_a_row_each_get_their_own_text(server):
    """Seed 001: the second stream returned the previous answer as one token."""
    bodies = [{"prompt": "The capital of France is", "max_length": 24, "sampler_seed": 11},
              {"prompt": "My favourite vegetable is", "max_length": 24, "sampler_seed": 12}]
    streamed = []
    for body in bodies:
        s = SSEStream(server, "/api/extra/generate/stream", body)
        events = [kobold_event_json(e) for e in s.events()]
        tokens = [e["token"] for e in events if e["finish_reason"] is None]
        assert len(tokens) > 3, tokens          # streamed token by token, not one lump
        streamed.append("".join(tokens))
    for body, text in zip(bodies, streamed):
        blocking = server.json("POST", "/api/v1/generate", body)["results"][0]["text"]
        assert text == blocking
    assert streamed[0] != streamed[1]
    assert streamed[0] not in streamed[1]


def test_dropped_stream_frees_the_engine(server):
    """Seed 002: generation went on burning the CPU after the client left."""
    stream = SSEStream(server, "/api/extra/generate/stream",
                       {"prompt": "Write an endless list of numbers:", "genkey": "KCPP-drop", **LONG})
    for _ in range(3):
        kobold_event_json(stream.next_event())
    stream.close()
    # The next request runs only once the engine is free; had the dropped one run on, it ran to 1500 tokens.
    after = server.json("POST", "/api/v1/generate", {"prompt": "Hello", "max_length": 4})
    assert after["results"][0]["text"]
    dropped = server.json("POST", "/api/extra/generate/check", {"genkey": "KCPP-drop"})["results"][0]["text"]
    n = server.json("POST", "/api/extra/tokencount", {"prompt": dropped, "special": False})["value"]
    assert 3 <= n < 200, n


def test_dropped_blocking_generate_frees_the_engine(server):
    """KoboldCpp notices a blocking client's hang-up only after the whole generation: we stop at once."""
    sock = server.raw_socket()
    body = json.dumps({"prompt": "Count to a thousand:", "genkey": "KCPP-blockdrop", **LONG}).encode()
    mark = server.mark()
    sock.sendall(b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    server.wait_for_line(r"genkey KCPP-blockdrop", start=mark)
    sock.close()
    server.json("POST", "/api/v1/generate", {"prompt": "Hi", "max_length": 2})
    text = server.json("POST", "/api/extra/generate/check", {"genkey": "KCPP-blockdrop"})["results"][0]["text"]
    n = server.json("POST", "/api/extra/tokencount", {"prompt": text, "special": False})["value"]
    assert n < 300, n


def test_eight_concurrent_clients_each_get_their_own_output(server):
    """Seed 003: concurrent requests froze llama-cpp-python (or mixed their outputs)."""
    bodies = [{"prompt": f"Story number {i}: once upon a time, a {animal}",
               "max_length": 20, "sampler_seed": 100 + i, "temperature": 0.9, "genkey": f"KCPP-conc-{i}"}
              for i, animal in enumerate(["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak"])]
    alone = [server.json("POST", "/api/v1/generate", b)["results"][0]["text"] for b in bodies]
    assert len(set(alone)) == len(alone)

    def via_stream(body):
        s = SSEStream(server, "/api/extra/generate/stream", body)
        return "".join(kobold_event_json(e)["token"] for e in s.events())

    def via_generate(body):
        return server.json("POST", "/api/v1/generate", body)["results"][0]["text"]

    pending = [in_thread(via_stream if i % 2 else via_generate, b) for i, b in enumerate(bodies)]
    together = [result_of(q) for q in pending]
    assert together == alone
    for b, text in zip(bodies, alone):
        check = server.json("POST", "/api/extra/generate/check", {"genkey": b["genkey"]})
        assert check["results"][0]["text"] == text
