"""--parallel N: several generations decoded in one batch per step (issue 6)."""

from __future__ import annotations

import time

import pytest

from tests.harness import ServerProcess, SSEStream, in_thread, kobold_event_json, result_of

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow"]


@pytest.fixture(scope="module")
def par(starter_model):
    # Every slot its own context: a fixed seed then gives the same text alone or beside others, which
    # these tests use to tell each reply is its own. In the default shared pool the slots' cells are
    # interleaved and the arithmetic rounds differently beside others (test_memory_knobs covers that).
    s = ServerProcess(["--model", starter_model, "--parallel", "3", "--contextsize", "1024", "--kvperslot"])
    yield s
    s.stop()


def body(i: int, n: int = 40, **kw) -> dict:
    return {"prompt": f"Story {i}: once upon a time, a {ANIMALS[i % 6]}", "max_length": n,
            "sampler_seed": 50 + i, "temperature": 0.9, "genkey": f"PAR-{i}-{n}", **kw}


def timed_stream(server, b) -> list[tuple[float, str, str | None]]:
    s = SSEStream(server, "/api/extra/generate/stream", b)
    out = []
    for e in s.events():
        ev = kobold_event_json(e)
        out.append((time.monotonic(), ev["token"], ev["finish_reason"]))
    return out


def text_of(events) -> str:
    return "".join(t for _, t, _ in events)


def test_concurrent_requests_overlap_and_keep_their_own_text(par):
    bodies = [body(i, 80, ban_eos_token=True) for i in range(3)]   # long enough to overlap on a busy machine
    alone = [par.json("POST", "/api/v1/generate", b)["results"][0]["text"] for b in bodies]
    runs = [result_of(q) for q in [in_thread(timed_stream, par, b) for b in bodies]]
    # Each one's tokens arrive between the others' first and last: they were decoded together.
    for i, a in enumerate(runs):
        for j, b in enumerate(runs):
            if i != j:
                assert a[0][0] < b[-2][0] and b[0][0] < a[-2][0], "the streams did not overlap"
    # The same seed gives the same text alone and beside others.
    assert [text_of(r) for r in runs] == alone
    perf = par.json("GET", "/api/extra/perf")
    assert perf["slots"] == 3 and perf["active_slots"] == 0 and perf["idle"] == 1


def test_abort_and_disconnect_of_one_slot_leave_the_others_streaming(par):
    long = {"ban_eos_token": True}
    keep = [in_thread(timed_stream, par, body(i, 120, **long)) for i in (0, 1)]
    aborted = SSEStream(par, "/api/extra/generate/stream", body(2, 1500, **long))
    dropped_key = "PAR-drop"
    dropped = SSEStream(par, "/api/extra/generate/stream", {**body(3, 1500, **long), "genkey": dropped_key})
    kobold_event_json(aborted.next_event())
    kobold_event_json(dropped.next_event())
    assert par.json("POST", "/api/extra/abort", {"genkey": "PAR-2-1500"})["success"] == "true"
    mark = par.mark()
    dropped.close()
    par.wait_for_line(r"ended: abort", start=mark)
    assert [kobold_event_json(e) for e in aborted.events()][-1]["finish_reason"] == "stop"
    for q in keep:
        events = result_of(q)
        assert events[-1][2] == "length"
        n = par.json("POST", "/api/extra/tokencount", {"prompt": text_of(events), "special": False})["value"]
        assert n >= 110       # ran to its full length (give or take merged tokens)


def test_queueing_beyond_the_slots(par):
    bodies = [body(i, 16) for i in range(6)]
    mark = par.mark()
    pending = [in_thread(par.json, "POST", "/api/v1/generate", b) for b in bodies]
    par.wait_for_line(r"queued at", start=mark)
    texts = [result_of(q)["results"][0]["text"] for q in pending]
    alone = [par.json("POST", "/api/v1/generate", b)["results"][0]["text"] for b in bodies]
    assert texts == alone


def test_a_new_request_reuses_the_slot_holding_its_prefix(par):
    stories = [f"Chapter {i}. The {a} walked into the old library and found a map." for i, a in enumerate(ANIMALS[:3])]
    outputs = [par.json("POST", "/api/v1/generate", {"prompt": s, "max_length": 10, "sampler_seed": 1})
               ["results"][0]["text"] for s in stories]
    # Continue the second story, then the first: each slot still holds its story, though others came after, and
    # the second's is not the least recently used one. (The reuse is read from the reply's own usage:
    # /api/extra/perf shows whichever job ended last.)
    for i in (1, 0):
        prompt_tokens = par.json("POST", "/api/extra/tokencount", {"prompt": stories[i]})["value"]
        usage = par.json("POST", "/v1/completions", {"prompt": stories[i] + outputs[i] + " Then",
                                                     "max_tokens": 2})["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= prompt_tokens + 8, (i, usage)


def test_a_prompt_sent_again_reuses_its_slot_though_its_reply_was_longer(par):
    # Regenerating a reply sends the same prompt again; its slot holds that prompt and a reply longer
    # than it. The slot must be found again, not the least recently used one (another story's).
    prompts = [f"Swipe {i}: the {a} sat by the fire and told a tale." for i, a in enumerate(ANIMALS[3:6])]
    for p in prompts[1:2] + prompts[0:1] + prompts[2:3]:     # the slot used least recently is not prompt 0's
        par.json("POST", "/api/v1/generate", {"prompt": p, "max_length": 60, "sampler_seed": 3})
    prompt_tokens = par.json("POST", "/api/extra/tokencount", {"prompt": prompts[0]})["value"]
    usage = par.json("POST", "/v1/completions", {"prompt": prompts[0], "max_tokens": 2})["usage"]
    # All but its last token, which is read again for the reply's first draw.
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1, usage


def test_metrics_report_slots(par):
    text = par.request("GET", "/metrics")[2].decode()
    assert "koboldlite_slots_total 3" in text and "koboldlite_queue_depth 0" in text
