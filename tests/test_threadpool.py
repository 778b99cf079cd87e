"""KoboldLite's own ggml threadpool where the build runs ggml's own threads, not OpenMP's (engine/threadpool.py),
on a real such build: tests/install.sh makes it (tools/build_llama_lib.sh noopenmp, into .llama-noopenmp/lib)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from koboldlite.engine.cpu_policy import WaitPolicy
from koboldlite.engine.threadpool import POLL, CountPools, ThreadpoolParams
from tests.harness import ROOT, ServerProcess

NO_OPENMP_BUILD = os.path.join(ROOT, ".llama-noopenmp", "lib")


def test_the_parameters_are_laid_out_as_ggmls_struct():
    """ggml.h: bool cpumask[512]; int n_threads; enum prio; uint32_t poll; bool strict_cpu; bool paused."""
    assert [getattr(ThreadpoolParams, f).offset for f in ("n_threads", "prio", "poll", "strict_cpu", "paused")] \
        == [512, 516, 520, 524, 525]
    assert ctypes.sizeof(ThreadpoolParams) == 528


def test_every_wait_policy_has_a_poll_level_from_sleeping_at_once_to_a_few_milliseconds():
    assert set(POLL) == set(WaitPolicy)
    assert POLL[WaitPolicy.PASSIVE] == 0 < POLL[WaitPolicy.SHORT] < POLL[WaitPolicy.SPIN] < 50     # ggml's default


def ticks_and_state(stat_path: str) -> tuple[int, str]:
    """A /proc stat file's CPU ticks so far (user and system) and state (R running, S sleeping)."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), fields[0]


def thread_cpu(pid: int) -> dict[int, tuple[int, str]]:
    """Each thread of the process: its CPU ticks so far and its state."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = ticks_and_state(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue                          # a thread that ended meanwhile
    return out


@pytest.mark.parametrize("cpuwait", ["spin", "passive"])
def test_a_build_without_openmp_runs_every_decode_on_a_threadpool_of_koboldlites_own(cpuwait):
    assert os.path.isdir(NO_OPENMP_BUILD), "tests/install.sh builds it: bash tools/build_llama_lib.sh noopenmp"
    poll = POLL[WaitPolicy(cpuwait)]
    s = ServerProcess(["--cpuwait", cpuwait, "--threads", "2", "--contextsize", "512", "--nodraft"],
                      env={"LLAMA_CPP_LIB_PATH": NO_OPENMP_BUILD})
    try:
        s.wait_for_line(rf"^CPU: this build runs ggml's own threads.*polling between decodes at ggml's level {poll} ")
        props = s.json("GET", "/props")
        assert props["cpu_backend"]["openmp"] is False
        assert props["threads"]["wait"] == {"policy": cpuwait, "in_force": True, "threadpool": {
            "threads": 2, "poll": poll, "pools": [2], "contexts": 1}}
        before = thread_cpu(s.proc.pid)
        r = s.json("POST", "/api/v1/generate", {"prompt": "Once upon a time", "max_length": 48,
                                                "ban_eos_token": True, "temperature": 0})
        assert r["results"][0]["text"]
        after = thread_cpu(s.proc.pid)
        # The work of every decode is shared by two threads that were there before the first request: the loop
        # thread, and the pool's worker made with the context. ggml's own pools start a worker for each decode,
        # which is gone once it ends; only the loop thread would have worked.
        grew = {tid: after[tid][0] - ticks for tid, (ticks, _) in before.items() if tid in after}
        most = max(grew.values())
        workers = [tid for tid, n in grew.items() if n >= most / 4]
        assert most > 0 and len(workers) == 2, grew
        if poll == 0:
            # Sleeping at once after each decode: by the time the reply is read, the pool's worker is asleep. It is
            # the earlier of the two (made with the context, before the loop thread starts; Linux numbers threads
            # upward), and the loop thread may still be busy with the reply's after-work.
            worker = min(workers)
            assert after[worker][1] == "S", after[worker]
    finally:
        status = s.stop()
    assert status == 0                      # the pools' workers, asleep, do not hold the process at exit


def process_cpu(pid: int) -> int:
    """The process's CPU ticks so far, its ended threads' included."""
    return ticks_and_state(f"/proc/{pid}/stat")[0]


def test_a_draft_models_decodes_run_on_the_models_threadpools_too(starter_model):
    """The draft model's context (the starter model drafting for itself) shares the model's pools: the work of a
    drafted reply is all done by threads that were there before it. ggml's own pool for each of the draft's
    decodes would start a worker for it, gone by the reply's end, its work counted in the process's CPU time
    but in no living thread's (checked: about a quarter of the reply's ticks, 99-113 of 365-413)."""
    assert os.path.isdir(NO_OPENMP_BUILD), "tests/install.sh builds it: bash tools/build_llama_lib.sh noopenmp"
    s = ServerProcess(["--model", starter_model, "--draftmodel", starter_model, "--draftamount", "4",
                       "--cpuwait", "passive", "--threads", "2", "--contextsize", "1024"],
                      env={"LLAMA_CPP_LIB_PATH": NO_OPENMP_BUILD})
    try:
        wait = s.json("GET", "/props")["threads"]["wait"]
        assert wait["threadpool"] == {"threads": 2, "poll": 0, "pools": [2], "contexts": 2}, wait
        body = {"prompt": "Once upon a time", "max_length": 160, "ban_eos_token": True, "temperature": 0,
                "draft_min": 4}          # paying or not (the step costs measured at start-up decide otherwise)
        s.json("POST", "/api/v1/generate", {**body, "max_length": 8})    # the HTTP server's threads, once
        before, process_before = thread_cpu(s.proc.pid), process_cpu(s.proc.pid)
        assert s.json("POST", "/api/v1/generate", body)["results"][0]["text"]
        after, process_after = thread_cpu(s.proc.pid), process_cpu(s.proc.pid)
        perf = s.json("GET", "/api/extra/perf")
        assert perf["last_draft_count"] > 100, perf         # the draft model drafted
        lived = sum(after[tid][0] - ticks for tid, (ticks, _) in before.items() if tid in after)
        total = process_after - process_before
        # Besides, only the request's own HTTP thread, born and gone with it (a tick or two of JSON).
        assert total > 20 and total - lived <= max(4, total // 20), (total, lived)
    finally:
        status = s.stop()
    assert status == 0


COUNTS_CHILD = r"""
import json, os, sys
from koboldlite.engine.cpu_threads import ThreadGovernor
from koboldlite.engine.engine import Engine
from koboldlite.engine.llama_model import LlamaModel
from koboldlite.generation import GenerationRequest, SamplerSettings
from tests.test_threadpool import thread_cpu


class Scripted(ThreadGovernor):
    '''Prompt reading at 2 threads, generation at whatever `now` says.'''
    now = 2

    def count(self, n_tokens):
        return 2 if n_tokens > self.GENERATION_WIDTH else self.now


# ggml's default poll level, longer than any --cpuwait gives: the pool left must sleep all the same
model = LlamaModel(sys.argv[1], n_ctx=512, n_seq=1, n_threads=2, n_gpu_layers=0, threadpool_poll=50,
                   threadpool_size=2)
gov = Scripted(2)
engine = Engine(model, threads=gov)
job = engine.prepare(GenerationRequest("Once upon a time " * 20, max_length=400,
                                       sampler=SamplerSettings(temperature=0, ban_eos=True)))
assert engine.admit(job)
out = []
for now in (2, 1, 2):
    gov.now = now
    engine.step()                                   # the first step at this count
    before = thread_cpu(os.getpid())
    for _ in range(40):
        engine.step()
        assert model.lib.llama_n_threads(model.ctx) == now
    after = thread_cpu(os.getpid())
    grew = {tid: after[tid][0] - ticks for tid, (ticks, _) in before.items() if tid in after}
    most = max(grew.values())
    out.append([now, sum(n >= most / 4 for n in grew.values()), model.threadpools.report()["pools"]])
model.close()
print(json.dumps(out))
"""


def test_a_count_shed_to_one_thread_leaves_the_pool_asleep_and_comes_back_to_it(starter_model):
    """A pool runs a decode at fewer threads than it has, but its idle workers would poll beside the busy programs
    that made the count shed: one thread runs on no pool, and the pool's worker sleeps meanwhile. Counted over 40
    steps at each count: the threads that did a share of the work (the main thread, and the pool's worker). This
    machine's 2 cores: more threads than cores wait at every barrier, so the pools of counts between 1 and the
    most are the unit test's below."""
    assert os.path.isdir(NO_OPENMP_BUILD), "tests/install.sh builds it: bash tools/build_llama_lib.sh noopenmp"
    out = subprocess.run([sys.executable, "-c", COUNTS_CHILD, starter_model], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "LLAMA_CPP_LIB_PATH": NO_OPENMP_BUILD})
    assert out.returncode == 0, out.stderr[-3000:]
    # [count, threads that worked, pools made so far], in the order the counts ran
    assert json.loads(out.stdout.splitlines()[-1]) == [[2, 2, [2]], [1, 1, [2]], [2, 2, [2]]]


class Recorded:
    """A llama library and a registry that only note what is asked of them: the threadpools made, and which one
    each context is attached to."""

    def __init__(self):
        self.calls, self.made = [], 0
        self.llama_attach_threadpool = lambda ctx, pool, batch: self.calls.append(("attach", pool, batch))
        self.llama_detach_threadpool = lambda ctx: self.calls.append(("detach",))

    def cpu_function(self, name):
        if name == "ggml_threadpool_new":
            return ctypes.cast(self._new, ctypes.c_void_p).value
        return ctypes.cast(self._free, ctypes.c_void_p).value

    def new(self, params):
        self.made += 1
        self.calls.append(("new", params.contents.n_threads, params.contents.poll))
        return 1000 + params.contents.n_threads

    def free(self, handle):
        self.calls.append(("free", handle))


def recorded() -> Recorded:
    r = Recorded()
    r._new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ThreadpoolParams))(r.new)
    r._free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(r.free)
    return r


def test_each_count_gets_a_pool_of_its_own_kept_until_the_context_is_freed():
    r = recorded()
    pools = CountPools(r, most=8, poll=1).attach(r, ctx=None, count=8)
    for count in (8, 6, 1, 6, 8, 5, 8):
        pools.use(count)
    assert r.calls == [("new", 8, 1), ("attach", 1008, 1008), ("new", 6, 1), ("attach", 1006, 1006), ("detach",),
                       ("attach", 1006, 1006), ("attach", 1008, 1008), ("new", 5, 1), ("attach", 1005, 1005),
                       ("attach", 1008, 1008)]
    assert pools.report() == {"threads": 8, "poll": 1, "pools": [5, 6, 8], "contexts": 1}
    pools.release()
    assert sorted(r.calls[-3:]) == [("free", 1005), ("free", 1006), ("free", 1008)]
    pools.release()                                     # once only
    assert len(r.calls) == 13


def test_a_draft_models_context_shares_the_pools_and_they_outlive_both_contexts():
    """The model's context and its draft model's, decoded by one thread, each at its own count on the same pools;
    the pools are freed with the last of the two, whichever that is."""
    for last in ("target", "draft"):
        r = recorded()
        shared = CountPools(r, most=4, poll=2)
        target = shared.attach(r, ctx=None, count=4)
        draft = shared.attach(r, ctx=None, count=1)       # one thread: on no pool
        target.use(3)
        draft.use(4)
        draft.use(3)
        assert r.made == 2 and shared.report() == {"threads": 4, "poll": 2, "pools": [3, 4], "contexts": 2}
        assert r.calls == [("new", 4, 2), ("attach", 1004, 1004), ("detach",), ("new", 3, 2),
                           ("attach", 1003, 1003), ("attach", 1004, 1004), ("attach", 1003, 1003)]
        first, second = (draft, target) if last == "target" else (target, draft)
        first.release()
        assert not any(call[0] == "free" for call in r.calls) and shared.report()["contexts"] == 1
        second.release()
        assert sorted(r.calls[-2:]) == [("free", 1003), ("free", 1004)] and shared.pools == {}
