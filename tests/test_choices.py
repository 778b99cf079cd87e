"""Several choices per request (issue 37, item 7): OpenAI's `n` (1..8) on completions and chat, streamed (each
chunk's `index`) and not, with the official openai client. The first choice reads the prompt and the others start
once it has been read: with one slot each finds the prompt in the slot's cache, with --parallel a slot of its own
borrows its cells; each choice draws from its own seed (the request's + its index), so a seeded choice is the same
text as a request of its own with that seed; usage counts the prompt once; a hang-up cancels every choice."""

from __future__ import annotations

import re

import pytest

from tests.harness import ServerProcess, SSEStream, openai_client_for

ASK = [{"role": "user", "content": "Write one sentence about the sea."}]
SAMPLED = dict(temperature=1.0, extra_body={"top_k": 40})


@pytest.fixture(scope="module")
def one_slot(starter_model):
    s = ServerProcess(["--model", starter_model, "--contextsize", "1024"])
    yield s
    s.stop()


def ended_jobs(server, mark: int, count: int) -> list[re.Match]:
    found, start = [], mark
    for _ in range(count):
        m = server.wait_for_line(r"job (\d+) ended: (\w+), (\d+) prompt tokens \((\d+) cached\)", start=start)
        found.append(m)
        start = server.lines.index(m.string, start) + 1
    return found


def test_seeded_choices_are_the_requests_of_their_own_seeds(one_slot):
    client = openai_client_for(one_slot)
    mark = one_slot.mark()
    many = client.chat.completions.create(model="m", messages=ASK, max_tokens=12, n=3, seed=5, **SAMPLED)
    assert [c.index for c in many.choices] == [0, 1, 2]
    jobs = sorted(ended_jobs(one_slot, mark, 3), key=lambda m: int(m.group(1)))
    prompt = int(jobs[0].group(3))
    assert all(int(j.group(4)) >= prompt - 1 for j in jobs[1:])          # the prompt was read once
    assert many.usage.prompt_tokens == prompt
    assert many.usage.completion_tokens == sum(int(re.search(r"(\d+) generated", j.string).group(1)) for j in jobs)
    alone = [client.chat.completions.create(model="m", messages=ASK, max_tokens=12, seed=5 + i, **SAMPLED)
             .choices[0].message.content for i in range(3)]
    assert [c.message.content for c in many.choices] == alone
    assert len(set(alone)) > 1                                       # their own seeds: not one text three times


def test_streamed_choices_carry_their_index_and_one_usage(one_slot):
    client = openai_client_for(one_slot)
    chunks = list(client.chat.completions.create(model="m", messages=ASK, max_tokens=10, n=2, seed=9, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    texts, finished = {0: "", 1: ""}, {0: 0, 1: 0}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finished[choice.index] += choice.finish_reason is not None
    assert finished == {0: 1, 1: 1} and all(texts.values())
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and chunks[-1].usage is not None
    whole = client.chat.completions.create(model="m", messages=ASK, max_tokens=10, n=2, seed=9, **SAMPLED)
    assert [c.message.content for c in whole.choices] == [texts[0], texts[1]]   # streamed and whole agree


def test_completions_take_n_too(one_slot):
    client = openai_client_for(one_slot)
    made = client.completions.create(model="m", prompt="The sea is", max_tokens=6, n=4, seed=1, **SAMPLED)
    assert sorted(c.index for c in made.choices) == [0, 1, 2, 3] and all(c.text for c in made.choices)


def test_n_out_of_bounds_is_a_400(one_slot):
    for n in (0, 9, "two"):
        body = one_slot.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, "n": n}, expect=400)
        assert "'n'" in body["error"]["message"]


def test_with_parallel_slots_the_choices_borrow_the_prompts_cells(starter_model):
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048", "--parallel", "3"])
    try:
        mark = s.mark()
        s.json("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 24, "n": 3, "seed": 3})
        jobs = sorted(ended_jobs(s, mark, 3), key=lambda m: int(m.group(1)))     # they end in any order
        prompt = int(jobs[0].group(3))
        assert int(jobs[0].group(4)) == 0
        assert all(int(j.group(4)) >= prompt - 1 for j in jobs[1:]), [j.string for j in jobs]
    finally:
        s.stop()


def test_a_hang_up_cancels_every_choice(one_slot):
    mark = one_slot.mark()
    # The first choice writes until its length (no end of turn), and the others wait their turn for the one slot.
    stream = SSEStream(one_slot, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2000, "n": 3,
                                                          "stream": True, "ban_eos_token": True})
    while b'"content": "' not in stream.raw.split(b'"role"', 1)[-1]:     # the first choice's text has begun
        assert stream.next_event() is not None
    stream.close()
    reasons = {m.group(2) for m in ended_jobs(one_slot, mark, 3)}
    assert reasons == {"abort"}
