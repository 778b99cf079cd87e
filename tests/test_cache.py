"""Conversations that survive (issue 27): a prompt cache beyond the slots, in RAM and on disk across restarts,
llama-server's /slots save and restore, and KoboldCpp's admin states, on the real server."""

from __future__ import annotations

import glob
import os
import random
import re

from koboldlite.generation import GenerationRequest, SamplerSettings
from koboldlite.jobs import Job
from koboldlite.engine.llama_model import LlamaModel
from koboldlite.engine.engine import Engine
from tests.harness import ServerProcess

random.seed(5)
WORDS = ("lantern harbour meadow cipher ember willow falcon copper orchard beacon thistle glacier saddle quarry "
         "river stone").split()


def notes(n_words: int, tag: str) -> str:
    rng = random.Random(tag)
    return f"Notes {tag}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


LONG = [{"role": "system", "content": "You answer briefly.\n" + notes(2900, "long")},
        {"role": "user", "content": "Which word comes first in the notes?"}]


def chat(server, messages, max_tokens=8) -> tuple[str, dict]:
    """The reply, and its job's numbers from the log line."""
    mark = server.mark()
    reply = server.json("POST", "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens,
                                                          "temperature": 0})
    line = server.wait_for_line(r"job \d+ ended: \w+, (\d+) prompt tokens \((\d+) cached\)", start=mark).string
    m = re.search(r"(\d+) prompt tokens \((\d+) cached\)", line)
    source = re.search(r"cache from (\w+)", line)
    return reply["choices"][0]["message"]["content"], {"prompt": int(m.group(1)), "cached": int(m.group(2)),
                                                       "source": source.group(1) if source else "slot"}


def turn_two(first_reply: str) -> list[dict]:
    return LONG + [{"role": "assistant", "content": first_reply}, {"role": "user", "content": "And the last one?"}]


def displace(server, n=5):
    for i in range(n):
        chat(server, [{"role": "user", "content": notes(400, f"other {i}")}], max_tokens=2)


def state_files(folder) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*", "*.klstate")))


def test_a_displaced_conversation_comes_back_from_ram(starter_model):
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096"])
    try:
        first, stats = chat(s, LONG)
        assert stats["prompt"] > 3000
        displace(s)                                    # five other conversations take the only slot in turn
        again, stats = chat(s, turn_two(first))
        assert stats["source"] == "ram" and stats["cached"] >= 3000
        assert stats["prompt"] - stats["cached"] < 60          # only the new turn is read
        perf = s.json("GET", "/api/extra/perf")
        assert perf["last_cache_source"] == "ram" and perf["prompt_cache"]["conversations"] >= 5
        # The same request from the slot's own cache gives the same greedy reply.
        from_slot, stats = chat(s, turn_two(first))
        assert stats["source"] == "slot" and from_slot == again
    finally:
        s.stop()


def test_an_idle_slots_conversation_is_kept_before_it_is_displaced(starter_model):
    """Once the loop has been idle a moment, the slot's conversation is copied into the prompt cache, so the
    prompt that displaces it later does not wait while it is saved; the conversation still comes back."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096"])
    try:
        mark = s.mark()
        first, _ = chat(s, LONG)
        s.wait_for_line(r"kept slot 0's conversation \(\d+ tokens\) ahead", start=mark)
        cache = s.json("GET", "/api/extra/perf")["prompt_cache"]
        assert cache["saved_ahead"] == 1 and cache["saved_when_displaced"] == 0 and cache["conversations"] == 1
        displace(s, n=1)                              # takes the slot: LONG is kept already, not copied again
        cache = s.json("GET", "/api/extra/perf")["prompt_cache"]
        assert cache["saved_when_displaced"] == 0 and cache["conversations"] >= 1
        again, stats = chat(s, turn_two(first))
        assert stats["source"] == "ram" and stats["cached"] >= 3000
    finally:
        s.stop()


def test_idle_conversations_are_set_aside_before_a_long_job_in_a_shared_pool(starter_model):
    """--parallel 2, one shared pool: llama.cpp's attention reads every cell up to the highest in use, another
    slot's too, so before a job that puts 64 or more tokens through attention (its new prompt and the most it may
    write) the idle conversations that the prompt cache holds leave the pool (KVPool.set_aside_idle); a job of a
    few tokens leaves them in place. A short prompt with a reply of up to 96 tokens counts as long: each of its
    tokens would read the idle cells. The conversation set aside comes back from RAM with only its new turn read,
    and its reply is the one its slot gives."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "8192", "--parallel", "2", "--nodraft"])
    try:
        mark = s.mark()
        first, _ = chat(s, LONG)
        s.wait_for_line(r"kept slot (\d+)'s conversation \(\d+ tokens\) ahead", start=mark)
        chat(s, [{"role": "user", "content": "Hi"}], max_tokens=4)        # a short job: nothing moves
        assert s.json("GET", "/api/extra/perf")["kv_set_aside"] == 0
        mark = s.mark()
        chat(s, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "Tell me a story."}], max_tokens=96)
        s.wait_for_line(r"set 1 idle conversation\(s\) aside in the prompt cache", start=mark)
        assert s.json("GET", "/api/extra/perf")["kv_set_aside"] == 1
        again, stats = chat(s, turn_two(first))
        assert stats["source"] == "ram" and stats["cached"] >= 3000 and stats["prompt"] - stats["cached"] < 60
        from_slot, stats = chat(s, turn_two(first))
        assert stats["source"] == "slot" and from_slot == again
    finally:
        s.stop()


def test_a_short_idle_conversation_is_set_aside_too(starter_model):
    """A conversation too short for the prompt cache to keep when displaced (under 256 tokens) still costs every
    token of a long job its cells' attention: from 64 tokens up it is set aside all the same, and comes back
    from RAM when its chat goes on."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096", "--parallel", "2", "--nodraft"])
    try:
        short = [{"role": "user", "content": notes(80, "short")}]
        first, stats = chat(s, short)
        assert 64 <= stats["prompt"] < 240
        mark = s.mark()
        chat(s, [{"role": "user", "content": "Tell me a story."}], max_tokens=96)     # the other slot
        s.wait_for_line(r"set 1 idle conversation\(s\) aside in the prompt cache", start=mark)
        assert s.json("GET", "/api/extra/perf")["kv_set_aside"] == 1
        _, stats = chat(s, short + [{"role": "assistant", "content": first}, {"role": "user", "content": "More."}])
        assert stats["source"] == "ram" and stats["cached"] >= 64
    finally:
        s.stop()


def test_a_short_conversation_set_aside_comes_back_though_another_slot_shares_its_start(starter_model):
    """A short chat set aside in a shared pool, whose system prompt another slot holds too: brought back from RAM
    it saves re-reading everything after that start, and a copy back costs less than reading a few tokens, so it is
    restored (before, it had to save 64 tokens more than the shared start and was read again)."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096", "--parallel", "2", "--nodraft"])
    try:
        system = {"role": "system", "content": notes(20, "shared")}
        short = [system, {"role": "user", "content": notes(25, "short")}]
        first, stats = chat(s, short)
        kept = stats["prompt"] + 8
        mark = s.mark()
        _, story = chat(s, [system, {"role": "user", "content": "Tell me a story."}], max_tokens=96)
        s.wait_for_line(r"set 1 idle conversation\(s\) aside in the prompt cache", start=mark)
        # The other slot took the shared start from this chat's cells: it is what a slot would supply later.
        assert story["cached"] >= 20 and 64 <= kept and kept - story["cached"] < 64
        _, stats = chat(s, short + [{"role": "assistant", "content": first}, {"role": "user", "content": "More."}])
        assert stats["source"] == "ram" and stats["prompt"] - stats["cached"] < 16
    finally:
        s.stop()


def test_a_chats_next_turn_is_read_ahead_while_idle(starter_model):
    """Once the loop is idle, the template's close of the reply's turn and open of the user's are read into the
    slot: the next turn then reads only the user's new words. A client that sends something else back loses
    nothing but the guess, and its reply is the reply it gets from a cold read."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096"])
    try:
        mark = s.mark()
        first, _ = chat(s, LONG)
        read = int(s.wait_for_line(r"read slot 0's next turn ahead \((\d+) tokens\)", start=mark).group(1))
        again, stats = chat(s, turn_two(first))
        new_words = s.json("POST", "/api/extra/tokencount",
                           {"prompt": "And the last one?<|im_end|>\n<|im_start|>assistant\n"})["value"] \
            - s.json("POST", "/api/extra/tokencount", {"prompt": ""})["value"]
        assert stats["source"] == "slot" and stats["prompt"] - stats["cached"] == new_words
        assert read >= 5 and s.json("GET", "/api/extra/perf")["read_ahead_tokens"] == read
        # The guess left the reply as it is: the same turn read cold by a fresh server gives it too.
        edited = LONG + [{"role": "assistant", "content": "Lantern, I think."}, {"role": "user", "content": "Sure?"}]
        mark = s.mark()
        chat(s, turn_two(first))                        # and once more, so the slot ends on this reply...
        s.wait_for_line(r"read slot 0's next turn ahead", start=mark)
        edited_reply, stats = chat(s, edited)            # ...which this client does not send back
        assert stats["cached"] < stats["prompt"] - 10
    finally:
        s.stop()
    cold = ServerProcess(["--model", starter_model, "--contextsize", "4096"])
    try:
        assert chat(cold, turn_two(first))[0] == again and chat(cold, edited)[0] == edited_reply
    finally:
        cold.stop()


def finished_reply(engine, prompt: str, next_turn, max_length=6) -> Job:
    greedy = SamplerSettings(temperature=0, ban_eos=True)
    job = engine.prepare(GenerationRequest(prompt, max_length=max_length, sampler=greedy,
                                                      next_turn=next_turn))
    assert engine.admit(job)
    while not job.buffer.done:
        engine.step()
    return job


def test_a_guess_is_read_only_where_it_continues_the_slot_and_finds_free_room(starter_model):
    """NextTurnReader's limits, read back from llama.cpp: a guess that goes on from the slot's cache is read
    and its cells are there; one that does not continue it, one too long, a request with no template's turn
    and one that would need another slot's cells are not read, and leave the caches as they were."""
    model = LlamaModel(starter_model, n_ctx=256, n_seq=2, n_threads=2, n_gpu_layers=0, shared_kv=True)
    engine = Engine(model)
    slot = engine.slots[0]
    prompt = "The colours of the flag are"
    job = finished_reply(engine, prompt, lambda reply: prompt + reply + "\nUser: and the sky?")
    held = len(slot.cached)
    assert engine.read_ahead(slot) > 0 and len(slot.cached) > held
    assert model.lib.llama_memory_seq_pos_max(model.memory, slot.seq_id) == len(slot.cached) - 1
    assert engine.read_ahead(slot) == 0                                   # once per reply
    for next_turn in (lambda reply: "Something else entirely." + reply,               # not this conversation
                      lambda reply: prompt + reply + " and more" * 40,                # past MOST tokens
                      None):                                                          # no chat template
        job = finished_reply(engine, prompt, next_turn)
        before = list(slot.cached)
        assert engine.read_ahead(slot) == 0 and slot.cached == before
    assert job.buffer.text()
    # A pool with no cells to spare: the other slot's idle cache is not dropped for a guess.
    finished_reply(engine, prompt, lambda reply: prompt + reply + " The end.")
    other = engine.slots[1]
    other.cached = list(range(1000, 1000 + model.pool_tokens - len(slot.cached)))     # the rest of the pool
    assert engine.read_ahead(slot) == 0 and len(other.cached) == model.pool_tokens - len(slot.cached)


def test_after_a_restart_it_comes_back_from_disk(starter_model, tmp_path):
    folder = str(tmp_path / "cache")
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096", "--cachedir", folder])
    try:
        first, _ = chat(s, LONG)
        expected, _ = chat(s, turn_two(first))        # from the slot: the reply to compare with
    finally:
        assert s.stop() == 0                          # a clean stop writes what is in RAM
    assert state_files(folder)
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096", "--cachedir", folder])
    try:
        assert any("conversation(s) on disk" in line for line in s.lines)
        again, stats = chat(s, turn_two(first))
        assert stats["source"] == "disk" and stats["cached"] >= 3000 and again == expected
    finally:
        s.stop()


def test_foreign_damaged_and_other_layout_files_are_skipped(starter_model, gemma_model, tmp_path):
    folder = str(tmp_path / "cache")
    smol_dir = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1")
    made = {}
    for name, args in (("other context", ["--model", starter_model, "--contextsize", "2048"]),
                       ("gemma", ["--model", gemma_model, "--contextsize", "4096"]),
                       ("good", ["--model", starter_model, "--contextsize", "4096"])):
        before = set(state_files(folder))
        s = ServerProcess([*args, "--cachedir", folder])
        try:
            chat(s, [{"role": "user", "content": notes(600, name)}], max_tokens=2)
        finally:
            s.stop()
        made[name] = (set(state_files(folder)) - before).pop()
        os.replace(made[name], str(tmp_path / os.path.basename(made[name])))     # aside: each start reads the folder
        made[name] = str(tmp_path / os.path.basename(made[name]))
    os.replace(made["gemma"], os.path.join(smol_dir, "from-gemma.klstate"))        # offered to SmolLM2
    for name in ("other context", "good"):
        os.replace(made[name], os.path.join(smol_dir, os.path.basename(made[name])))
        made[name] = os.path.join(smol_dir, os.path.basename(made[name]))
    with open(made["good"], "rb") as f:
        data = f.read()
    with open(os.path.join(smol_dir, "cut.klstate"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(smol_dir, "random.klstate"), "wb") as f:
        f.write(os.urandom(5000))
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096", "--cachedir", folder])
    try:
        skipped = [line for line in s.lines if "prompt cache: skipped" in line]
        assert len(skipped) == 4, skipped
        assert any("from-gemma.klstate: made by another model or layout (model_size differs)" in l for l in skipped)
        assert any(os.path.basename(made["other context"]) in l and "n_ctx differs" in l for l in skipped)
        assert any("cut.klstate: cut short" in l for l in skipped)
        assert any("random.klstate: not a KoboldLite state file" in l for l in skipped)
        assert os.listdir(smol_dir) == [os.path.basename(made["good"])]          # the rest removed, never loaded
        assert any("1 conversation(s) on disk" in line for line in s.lines)
        _, stats = chat(s, [{"role": "user", "content": notes(600, "good")}, ], max_tokens=2)
        assert stats["source"] == "disk" and stats["cached"] > 500                # the good one still serves
    finally:
        s.stop()


def test_ram_and_disk_bounds_hold(starter_model, tmp_path):
    folder = str(tmp_path / "cache")
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048", "--cacheram", "20", "--cachedisk", "40",
                       "--cachedir", folder])
    try:
        for i in range(8):        # each about 650 tokens: about 14 MiB of state
            chat(s, [{"role": "user", "content": notes(600, f"bound {i}")}], max_tokens=2)
            cache = s.json("GET", "/api/extra/perf")["prompt_cache"]
            assert cache["ram_mib"] <= 20 and cache["disk_mib"] <= 40, cache
            assert sum(os.path.getsize(f) for f in state_files(folder)) <= 41 * 2**20
        assert cache["on_disk"] >= 2 and cache["conversations"] >= 3
    finally:
        s.stop()
    assert sum(os.path.getsize(f) for f in state_files(folder)) <= 41 * 2**20     # after the final flush too


def test_a_conversation_comes_back_when_keeping_the_slots_own_drops_it_from_ram(starter_model):
    """RAM for one conversation only: bringing A back puts B, the slot's conversation, into the cache first, and
    the bound then drops its least recently used entry, A itself. A is restored all the same (it was a 500)."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "2048", "--cacheram", "20"])
    try:
        a = [{"role": "user", "content": notes(600, "bound A")}]
        chat(s, a, max_tokens=2)
        chat(s, [{"role": "user", "content": notes(600, "bound B")}], max_tokens=2)    # A leaves the slot
        assert s.json("GET", "/api/extra/perf")["prompt_cache"]["conversations"] == 1
        _, stats = chat(s, a, max_tokens=2)
        assert stats["source"] == "ram" and stats["cached"] >= 600
        cache = s.json("GET", "/api/extra/perf")["prompt_cache"]
        assert cache["ram_mib"] <= 20 and cache["conversations"] == 1, cache     # B's, A being in the slot
    finally:
        s.stop()


def test_slots_save_restore_erase(starter_model, gemma_model, tmp_path):
    saves = str(tmp_path / "slots")
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096", "--slot-save-path", saves])
    try:
        first, _ = chat(s, LONG)
        slots = s.json("GET", "/slots")
        assert slots[0]["id"] == 0 and not slots[0]["is_processing"] and slots[0]["n_cached"] > 3000
        saved = s.json("POST", "/slots/0?action=save", {"filename": "story.bin"})
        assert saved["n_saved"] > 3000 and saved["n_written"] > 10**6 and os.path.isfile(os.path.join(saves, "story.bin"))
        assert s.json("POST", "/slots/0?action=erase")["n_erased"] == saved["n_saved"]
        assert s.json("GET", "/slots")[0]["n_cached"] == 0
        assert s.json("POST", "/slots/0?action=restore", {"filename": "story.bin"})["n_restored"] == saved["n_saved"]
        _, stats = chat(s, turn_two(first))
        assert stats["cached"] >= 3000
        for bad in ["../story.bin", "a/b", "/etc/passwd", "..", ".hidden"]:
            status, _, body = s.request("POST", "/slots/0?action=save", {"filename": bad})
            assert status == 400 and b"Invalid filename" in body, bad
        assert s.request("POST", "/slots/7?action=save", {"filename": "x"})[0] == 404
        assert s.request("POST", "/slots/0?action=restore", {"filename": "none.bin"})[0] == 404
        assert s.request("POST", "/slots/0?action=fly")[0] == 400
    finally:
        s.stop()
    # A state saved by Gemma is refused by SmolLM2.
    g = ServerProcess(["--model", gemma_model, "--contextsize", "4096", "--slot-save-path", saves])
    try:
        chat(g, [{"role": "user", "content": "Hello there, how are you?"}], max_tokens=2)
        g.json("POST", "/slots/0?action=save", {"filename": "gemma.bin"})
    finally:
        g.stop()
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096", "--slot-save-path", saves])
    try:
        status, _, body = s.request("POST", "/slots/0?action=restore", {"filename": "gemma.bin"})
        assert status == 400 and b"made by another model" in body
        plain = ServerProcess(["--model", starter_model, "--contextsize", "1024"])
        try:
            assert plain.request("POST", "/slots/0?action=save", {"filename": "x"})[0] == 501
        finally:
            plain.stop()
    finally:
        s.stop()


def test_koboldcpp_admin_states(starter_model):
    s = ServerProcess(["--model", starter_model, "--contextsize", "4096", "--admin", "--adminpassword", "boss"])
    admin = {"Authorization": "Bearer boss"}
    try:
        first, _ = chat(s, LONG)
        assert s.request("POST", "/api/admin/save_state", {"slot": 1})[0] == 401
        saved = s.json("POST", "/api/admin/save_state", {"slot": 1}, headers=admin)
        assert saved["success"] and saved["new_tokens"] > 3000
        assert s.json("POST", "/api/admin/check_state", {"slot": 1}, headers=admin)["old_states"][1] == \
            saved["new_tokens"]
        displace(s, 1)
        loaded = s.json("POST", "/api/admin/load_state", {"slot": 1}, headers=admin)
        assert loaded["success"] and loaded["new_tokens"] == saved["new_tokens"]
        _, stats = chat(s, turn_two(first))
        assert stats["cached"] >= 3000
        assert s.json("POST", "/api/admin/clear_state", {"slot": 1}, headers=admin)["success"]
        assert s.json("POST", "/api/admin/load_state", {"slot": 1}, headers=admin)["success"] is False
        assert s.request("POST", "/api/admin/save_state", {"slot": 9}, headers=admin)[0] == 400
    finally:
        s.stop()
