"""Sharing the CPU (issue 36): the thread count that sheds threads while other programs take the cores and comes
back when they leave, the wait policy and the priority, each honoured and reported. Speeds are bench_neighbours.py's
(bench/README.md); these tests check the mechanics."""

from __future__ import annotations

import json
import os
import sys

from types import SimpleNamespace

import pytest

from koboldlite.api.common import threads_report
from koboldlite.engine.cpu_policy import Priority, WaitPolicy, apply_wait_policy
from koboldlite.engine.cpu_threads import CountControl, ThreadGovernor, ThreadMode
from koboldlite.engine.cpu_topology import math_cores
from koboldlite.engine.system_load import Reading, SystemLoad
from koboldlite.engine.engine import Engine
from koboldlite.engine.llama_model import LlamaModel
from koboldlite.generation import GenerationRequest, SamplerSettings


class Machine:
    """A simulated 2-core machine: what one step costs with n threads, quiet or beside a busy program (the shape
    measured on this project's machine: one thread 0.7 of two quiet, two threads a fifth beside a busy loop)."""

    COST = {False: {1: 0.012, 2: 0.008}, True: {1: 0.012, 2: 0.045}}

    def __init__(self, busy_means_taken: bool = True):
        self.busy = False
        self.niced_cores = 0.0              # programs at nice > 0 (their steps' cost is not simulated)
        self.reading_seconds = 1.0          # how long the readings are (a pause's)
        self.busy_means_taken = busy_means_taken     # False: a container's readings (the host's), or Windows' all

    def others(self) -> float:
        return 1.0 if self.busy else 0.0

    def niced(self) -> float:
        return self.niced_cores

    def niced_seconds(self) -> float:
        return self.niced_cores * self.reading_seconds

    def running_now(self) -> int:
        return int(self.busy)

    def report(self) -> dict:
        return {"source": "scripted", "busy_means_taken": self.busy_means_taken}


def run(control: CountControl, machine: Machine, steps: int, bucket: int = 1) -> list[int]:
    counts = []
    for _ in range(steps):
        n = control.count()
        counts.append(n)
        control.record(bucket, Machine.COST[machine.busy][n])
    return counts


def shed_beside_a_busy_program(quiet_steps: int, machine: Machine | None = None) -> tuple[Machine, CountControl]:
    """A control that ran quiet_steps on a quiet machine, then 200 beside a busy program (where it sheds to one)."""
    machine = machine or Machine()
    control = CountControl(2, load=machine)
    run(control, machine, quiet_steps)
    machine.busy = True
    run(control, machine, 200)
    return machine, control


def test_the_count_sheds_a_thread_beside_a_busy_program_and_comes_back_when_it_leaves():
    machine = Machine()
    control = CountControl(2, load=machine)
    quiet = run(control, machine, 500)
    assert set(quiet) == {2} and control.probes == 0, "a quiet machine runs every step on every core"
    machine.busy = True
    busy = run(control, machine, 500)
    assert control.current == 1 and control.sheds == 1
    assert busy.index(1) < 40, "shed within a few dozen steps"
    # Settled beside the busy program: a step at two threads now and then, no more.
    assert busy[100:].count(2) <= 12
    machine.busy = False
    back = run(control, machine, 200)
    assert control.current == 2 and control.returns == 1
    assert back.index(2) < 40 and back[60:] == [2] * 140
    assert control.report() == {"mode": "adaptive", "most": 2, "now": 2, "sheds": 1, "returns": 1,
                                "probes": control.probes}


def test_where_busy_readings_may_leave_the_cores_free_a_probe_for_more_stops_at_its_first_step_and_backs_off():
    """A container's /proc/stat is the host's: busy cores may not be ours, so the count still tries more threads
    now and then whatever the readings say (the longest wait). Beside programs that hold every core such a step
    costs several at one thread (spinning at each barrier for a thread the system took away): the probe stops at
    its first step, and each that fails waits twice as long as the last, up to BLIND_LONGEST longest waits."""
    machine, control = shed_beside_a_busy_program(100, Machine(busy_means_taken=False))
    assert control.current == 1
    probes = control.probes
    busy = run(control, machine, 30 * control.longest_interval)
    starts = [i for i in range(1, len(busy)) if busy[i] == 2]
    assert busy.count(2) == len(starts) == control.probes - probes >= 4, "one step at two threads for each probe"
    waits = [b - a for a, b in zip(starts, starts[1:])]
    assert waits[0] >= 2 * control.longest_interval and waits[-1] >= control.BLIND_LONGEST * control.longest_interval
    assert waits == sorted(waits) and control.current == 1
    machine.busy = False
    back = run(control, machine, (control.BLIND_LONGEST + 1) * control.longest_interval)
    assert control.current == 2 and back[-100:] == [2] * 100, "free again: the next blind probe takes them back"


def test_where_busy_readings_mean_taken_cores_no_probe_is_made_against_them():
    """On a machine whose readings count only the cores this process runs on (Linux, no container), a busy program
    that holds them is not probed for more threads at all (each such step, up to 3 s beside busy loops, bought
    nothing): the readings say when it has gone, and the count comes back then."""
    machine, control = shed_beside_a_busy_program(100)
    probes = control.probes
    assert run(control, machine, 20 * control.longest_interval) == [1] * (20 * control.longest_interval)
    assert control.probes == probes
    machine.busy = False
    back = run(control, machine, 60)
    assert control.current == 2 and back.index(2) < 30


def test_without_the_systems_load_the_count_still_comes_back_after_the_longest_wait():
    machine = Machine()
    control = CountControl(2, load=None, longest_interval=256)
    run(control, machine, 50)
    machine.busy = True
    run(control, machine, 200)
    assert control.current == 1
    machine.busy = False
    back = run(control, machine, 600)
    assert control.current == 2 and back.index(2) <= 520


def test_a_quiet_machine_pays_for_almost_no_probes():
    """On a quiet machine the full count is tried lower only after the longest wait, and the failed probe
    doubles nothing past it: at most probe_steps steps in every longest_interval run slower."""
    machine = Machine()
    control = CountControl(2, load=machine)
    counts = run(control, machine, 5000)
    assert counts.count(1) <= 6 * (5000 // 1024 + 1)
    assert control.current == 2 and control.sheds == 0


def test_steps_of_other_sizes_are_compared_only_with_their_own():
    """A step of four slots costs more than a step of one: a mix of both is not mistaken for contention."""
    control = CountControl(2, load=Machine())
    for i in range(600):
        width = 4 if i % 3 else 1
        control.record(width, (0.02 if width == 4 else 0.008))
    assert control.current == 2 and control.probes == 0


def test_fixed_counts_never_change():
    control = CountControl(8, fixed=3, load=Machine())
    for _ in range(2000):
        control.record(1, 1.0 if control.count() == 3 else 0.001)
    assert control.count() == 3 and control.mode is ThreadMode.FIXED and control.probes == 0


def test_the_governor_gives_generation_and_prompt_reading_their_own_counts():
    gov = ThreadGovernor(4, threads=0, threads_batch=2, load=Machine())   # quiet: a busy CI host would shed
    assert gov.count(1) == 4 and gov.count(16) == 4 and gov.count(17) == 2 and gov.count(512) == 2
    assert gov.report()["generation"]["mode"] == "adaptive" and gov.report()["batch"]["mode"] == "fixed"
    gov = ThreadGovernor(4, threads=3)
    assert gov.count(1) == 3 and gov.count(512) == 3          # --threads alone fixes both, as llama-server's -t
    assert gov.report()["batch"] == {**gov.report()["batch"], "mode": "fixed", "most": 3, "now": 3}


def generate(gov: ThreadGovernor, machine: Machine, steps: int) -> list[int]:
    counts = []
    for _ in range(steps):
        counts.append(gov.count(1))
        gov.record(1, Machine.COST[machine.busy][counts[-1]])
    return counts


def until_a_probe(gov: ThreadGovernor, machine: Machine):
    for _ in range(2 * gov.generation.longest_interval):
        if gov.generation.probe is not None:
            return
        generate(gov, machine, 1)
    raise AssertionError("no probe started within twice the longest wait")


def test_prompt_reading_runs_at_the_count_generation_found():
    """Without --threadsbatch a prompt chunk runs at the generation steps' count (every core beside busy programs
    waits at every barrier, as a step does): every core on a quiet machine, one beside a busy program, never a
    probe's count; its time changes no count."""
    machine = Machine(busy_means_taken=False)     # a container's: blind probes
    gov = ThreadGovernor(2, load=machine)
    generate(gov, machine, 50)
    assert gov.count(17) == 2 and gov.count(512) == 2
    assert gov.report()["batch"] == {"mode": "following", "most": 2, "now": 2, "past_cores": False,
                                     "chunks_past_cores": 0}
    machine.busy = True
    generate(gov, machine, 200)
    assert gov.generation.current == 1 and gov.count(17) == 1 and gov.count(512) == 1
    assert gov.report()["batch"] == {"mode": "following", "most": 2, "now": 1, "past_cores": False,
                                     "chunks_past_cores": 0}
    generation = gov.generation
    until_a_probe(gov, machine)                     # the longest wait's probe for two threads, under way
    assert generation.probe.count == 2 and gov.count(512) == 1
    gov.record(512, 100.0)                         # a chunk's cost is not a step's
    assert generation.probe is not None and generation.current == 1 and gov.decode_seconds > 100


def test_a_request_that_begins_with_its_prompt_takes_the_pauses_readings():
    """The first decode after a pause is usually a prompt chunk: the readings over the pause decide its count, as
    they would a first step's (every core again once the busy program has gone, one where it started)."""
    machine = Machine()
    gov = ThreadGovernor(2, load=machine)
    generate(gov, machine, 50)
    machine.busy = True
    gov.generation._last_decode -= 10
    assert gov.count(512) == 1 and gov.generation.sheds == 1
    generate(gov, machine, 20)
    machine.busy = False
    gov.generation._last_decode -= 10
    assert gov.count(512) == 2 and gov.generation.returns == 1


def test_a_neighbour_that_ends_as_a_prompt_begins_costs_one_chunk_at_fewer_threads():
    """A program still running at the instant a request starts with its prompt (another server's threads just
    finishing) sheds the first chunk; the instant count read again after it gives the next chunk every core."""
    machine = Machine()
    gov = ThreadGovernor(2, load=machine)
    generate(gov, machine, 50)
    machine.busy = True
    gov.generation._last_decode -= 10
    assert gov.count(512) == 1
    machine.busy = False
    gov.record(512, 1.0)
    assert gov.count(512) == 2 and gov.count(512) == 2 and gov.generation.returns == 1
    # So too where the count was already low before the pause (the busy program ended as the request began).
    machine.busy = True
    generate(gov, machine, 200)
    gov.generation._last_decode -= 10
    assert gov.count(512) == 1
    machine.busy = False
    gov.record(512, 1.0)
    assert gov.count(512) == 2 and gov.generation.returns == 2


def test_prompt_chunks_alone_take_the_cores_back_once_the_readings_leave_them_free():
    """Requests that follow each other with no pause and read long prompts time no steps: once the busy program has
    gone, both readings (its average, and nothing running at the instant) give the next chunk every core; while
    it runs they keep one."""
    machine = Machine(busy_means_taken=False)     # a container's: blind probes
    gov = ThreadGovernor(2, load=machine)
    generate(gov, machine, 50)
    machine.busy = True
    generate(gov, machine, 200)
    for _ in range(20):
        assert gov.count(512) == 1
        gov.record(512, 1.0)
    until_a_probe(gov, machine)                     # a probe for two threads under way as the prompts come
    machine.busy = False
    gov.record(512, 1.0)
    assert gov.count(512) == 2 and gov.generation.returns == 1 and gov.generation.probe is None


def test_prompt_reading_runs_one_thread_past_the_cores_while_other_programs_take_them_all():
    """In a build whose threads sleep at a barrier past the cores (OpenMP's), a prompt chunk runs at one thread more
    than cores while other programs' threads take every core at the instant, and the generation count has shed;
    not beside one busy program on two cores (one thread has a core of its own), nor while every thread runs (the
    others yield: niced ones), nor in a build that spins past the cores too, nor at a fixed count."""
    machine = Machine()
    gov = ThreadGovernor(2, load=machine, past_cores=True)
    generate(gov, machine, 50)
    machine.running_now = lambda: 2                 # two busy programs, yet the generation count is every core's
    assert gov.count(512) == 2
    machine.busy = True
    generate(gov, machine, 200)
    assert gov.generation.current == 1 and gov.count(17) == 3 and gov.count(512) == 3 and gov.count(16) == 1
    assert gov.report()["batch"] == {"mode": "following", "most": 2, "now": 1, "past_cores": True,
                                     "chunks_past_cores": 2}
    machine.running_now = lambda: 1                 # one busy program
    assert gov.count(512) == 1 and gov.report()["batch"]["chunks_past_cores"] == 2
    machine.running_now = lambda: None              # a system that does not say
    assert gov.count(512) == 1
    spinning = ThreadGovernor(2, load=machine)      # a build without OpenMP: ggml's barrier always spins
    machine.running_now = lambda: 2
    generate(spinning, machine, 200)
    assert spinning.generation.current == 1 and spinning.count(512) == 1
    fixed = ThreadGovernor(2, threads=1, load=machine, past_cores=True)
    assert fixed.count(512) == 1 and fixed.report()["batch"]["mode"] == "fixed" and not fixed.past_cores


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_beside_a_busy_program_on_every_core_the_server_reads_prompts_past_the_cores(starter_model):
    """The real thing: pip's build (OpenMP), a busy process per core, and prompts of a few hundred tokens; the
    server reads one past the cores (its /api/extra/perf counts the chunks) and answers."""
    import multiprocessing
    from tests.harness import ServerProcess
    from tests.test_speculative import spin_until
    server = ServerProcess(["--model", starter_model, "--contextsize", "2048"])
    try:
        batch = json.loads(server.request("GET", "/api/extra/perf")[2])["threads"]["batch"]
        assert batch["past_cores"] is True and batch["chunks_past_cores"] == 0, batch
        stop = multiprocessing.Event()
        loops = [multiprocessing.Process(target=spin_until, args=(stop,)) for _ in os.sched_getaffinity(0)]
        for loop in loops:
            loop.start()
        try:
            for attempt in range(4):    # the first may start before the readings over the pause hold the loops
                status, _, body = server.request("POST", "/api/v1/generate", {
                    "prompt": f"Note {attempt}: " + "the cargo hold has crates of apples and pears, " * 40,
                    "max_length": 2, "temperature": 0})
                assert status == 200, body
                batch = json.loads(server.request("GET", "/api/extra/perf")[2])["threads"]["batch"]
                if batch["chunks_past_cores"]:
                    break
        finally:
            stop.set()
            for loop in loops:
                loop.join()
        assert batch["chunks_past_cores"] >= 1, batch
    finally:
        server.stop()


def test_the_systems_load_is_the_others_cpu_less_this_process():
    load = SystemLoad()
    # In one second: 2.5 busy seconds, 1 of them ours; 0.75 niced, 0.25 of them ours (as under --lowpriority).
    readings = iter([Reading(10.0, 100.0, 50.0, 5.0, 2.0), Reading(11.0, 102.5, 50.75, 6.0, 2.25)])
    load._read = lambda: next(readings)
    load._last = load._read()
    load.WINDOW = 0
    assert load.others() == pytest.approx(1.5) and load.niced() == pytest.approx(0.5)


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="reads /proc/stat; needs a core to leave out")
def test_readings_of_cores_this_process_may_not_run_on_do_not_mean_taken_cores():
    """Confined to fewer cores than /proc/stat counts (taskset; a container given a few of the host's), busy time
    read may be on the others: blind probes stay (CountControl._blind)."""
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert SystemLoad().busy_means_taken is False
    finally:
        os.sched_setaffinity(0, cores)
    with open("/proc/stat") as f:
        counted = sum(line.startswith("cpu") and line[3:4].isdigit() for line in f)
    assert SystemLoad().busy_means_taken is (counted <= len(cores))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_the_systems_load_reads_this_machine():
    load = SystemLoad()
    busy, niced = load._machine_seconds()
    assert busy > 0 and niced >= 0


def test_the_wait_policy_leaves_a_users_own_setting():
    env = {}
    assert apply_wait_policy(WaitPolicy.SHORT, env)["policy"] == "short" and env["GOMP_SPINCOUNT"] == "10000"
    env = {}
    apply_wait_policy(WaitPolicy.PASSIVE, env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    report = apply_wait_policy(WaitPolicy.SHORT, env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"} and report["policy"] == "environment"
    assert apply_wait_policy(WaitPolicy.SPIN, {})["environment"] == {}


def test_a_build_without_openmp_reports_the_policy_as_its_threadpools_poll_level():
    """ggml's own threads (a build without OpenMP, as on macOS) never read the variables --cpuwait sets: /props and
    /api/extra/perf give the policy as the poll level of the model's threadpool there, and not in force where it
    has none (the real builds: test_cpu_variants.py for the OPENMP feature, test_threadpool.py for the pool)."""
    policy = {"wait": {"policy": "environment", "environment": {"GOMP_SPINCOUNT": "10000"}, "in_force": True},
              "priority": "normal"}
    app = SimpleNamespace(cpu_policy=policy, config=SimpleNamespace(cpuwait="short"))
    engine = SimpleNamespace(threads=ThreadGovernor(2))
    pool = SimpleNamespace(report=lambda: {"threads": 2, "poll": 1})
    for openmp, threadpool, wait in (
            (True, None, policy["wait"]), (None, None, policy["wait"]),
            (False, pool, {"policy": "short", "threadpool": {"threads": 2, "poll": 1}, "in_force": True}),
            (False, None, {"policy": "short", "threadpool": None, "in_force": False})):
        served = SimpleNamespace(gpu_info={"cpu": {"openmp": openmp}}, engine=engine,
                                 model=SimpleNamespace(threadpools=threadpool))
        assert threads_report(app, served)["wait"] == wait
    assert policy["wait"]["in_force"] is True           # the start-up report itself stays as it was


class OneThreadForGeneration(ThreadGovernor):
    def __init__(self):
        super().__init__(2)
        self.recorded = []

    def count(self, n_tokens: int) -> int:
        return 1 if n_tokens <= self.GENERATION_WIDTH else 2

    def record(self, n_tokens: int, seconds: float):
        self.recorded.append(n_tokens)


def test_the_engine_runs_each_decode_at_the_governors_count(starter_model):
    """The count the governor gives is the one llama.cpp runs with (read back from the context), and every
    decode's cost comes back to it."""
    model = LlamaModel(starter_model, n_ctx=512, n_seq=1, n_threads=2, n_gpu_layers=0)
    gov = OneThreadForGeneration()
    engine = Engine(model, threads=gov)
    job = engine.prepare(GenerationRequest("Once upon a time " * 20, max_length=8,
                                           sampler=SamplerSettings(temperature=0, ban_eos=True)))
    assert engine.admit(job)
    engine.step()                                   # the prompt (but its last token: README, Determinism)
    assert model.lib.llama_n_threads_batch(model.ctx) == 2 and gov.recorded == [len(job.prompt_tokens) - 1]
    while job.stats.generated_tokens < 6:
        engine.step()
    assert model.lib.llama_n_threads(model.ctx) == 1 and model.lib.llama_n_threads_batch(model.ctx) == 1
    assert len(gov.recorded) >= 7 and gov.recorded[1:] == [1] * (len(gov.recorded) - 1)
    model.close()


class PromptPastTheCores(OneThreadForGeneration):
    def count(self, n_tokens: int) -> int:
        return 1 if n_tokens <= self.GENERATION_WIDTH else 3


def test_a_prompt_read_past_the_cores_gives_the_same_reply(starter_model):
    """llama.cpp runs a prompt chunk at more threads than the context was made with (three on a context of two),
    and the reply is the one read at the context's own count."""
    replies = []
    for gov in (OneThreadForGeneration(), PromptPastTheCores()):
        model = LlamaModel(starter_model, n_ctx=512, n_seq=1, n_threads=2, n_gpu_layers=0)
        engine = Engine(model, threads=gov)
        job = engine.prepare(GenerationRequest("The list of things to pack: " * 30, max_length=12,
                                               sampler=SamplerSettings(temperature=0, ban_eos=True)))
        assert engine.admit(job)
        engine.step()                               # the prompt, in one chunk
        assert model.lib.llama_n_threads_batch(model.ctx) == gov.count(512) and gov.recorded[0] > 100
        while not job.buffer.done:
            engine.step()
        replies.append(job.buffer.text())
        model.close()
    assert replies[0] == replies[1] and len(replies[0]) > 12


def thread_nice_values(pid: int) -> list[int]:
    values = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                values.append(int(f.read().rsplit(")", 1)[1].split()[16]))
        except (OSError, IndexError):
            pass                                    # a thread that ended meanwhile
    return values


def running_threads(pid: int) -> int:
    running = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                running += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:
            pass
    return running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_options_are_honoured_and_reported(make_server):
    """--threads and --threadsbatch fix the counts, --cpuwait sets the policy, --lowpriority lowers every thread
    (those llama.cpp makes later too); /props and /api/extra/perf say so. Idle, no thread spins."""
    s = make_server("--threads", "1", "--threadsbatch", "2", "--cpuwait", "passive", "--lowpriority", tls=False)
    status, _, body = s.request("POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 30,
                                                            "temperature": 0})
    assert status == 200, body
    threads = json.loads(s.request("GET", "/props")[2])["threads"]
    assert threads["wait"]["policy"] == "passive" and threads["wait"]["environment"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert threads["wait"]["in_force"] is True and threads["priority"] == Priority.LOW.value
    assert threads["generation"] == {"mode": "fixed", "most": 1, "now": 1, "sheds": 0, "returns": 0, "probes": 0}
    assert threads["batch"]["mode"] == "fixed" and threads["batch"]["now"] == 2
    perf = json.loads(s.request("GET", "/api/extra/perf")[2])
    assert {k: perf["threads"][k] for k in ("wait", "priority", "generation", "batch")} == \
        {k: threads[k] for k in ("wait", "priority", "generation", "batch")}
    assert 0 < threads["decode_seconds"] <= perf["threads"]["decode_seconds"]
    nice = thread_nice_values(s.proc.pid)
    assert len(nice) > 3 and set(nice) == {10}, nice
    # Idle: whatever runs now and then, nothing runs all the time (a spinning thread would show in every look).
    assert min(running_threads(s.proc.pid) for _ in range(200)) == 0


def test_the_default_server_adapts_and_says_so(server):
    threads = json.loads(server.request("GET", "/props")[2])["threads"]
    assert threads["wait"]["policy"] == "spin" and threads["priority"] == "normal"
    assert threads["generation"]["mode"] == "adaptive" and threads["batch"]["mode"] == "following"
    assert threads["batch"]["now"] == threads["generation"]["now"]
    assert 1 <= threads["generation"]["now"] <= threads["generation"]["most"] == math_cores()
    assert threads["logical_cpus"] == len(os.sched_getaffinity(0))
    with open("/proc/stat") as f:
        counted = sum(line.startswith("cpu") and line[3:4].isdigit() for line in f)
    assert threads["readings"] == {"source": "proc_stat", "busy_means_taken": counted <= len(os.sched_getaffinity(0))}


def test_bad_thread_options_are_refused_in_one_line(tmp_path):
    from koboldlite.config import load_config
    from koboldlite.errors import ConfigError
    for argv, words in ((["--cpuwait", "sometimes"], "cpuwait"), (["--highpriority", "--lowpriority"], "one of"),
                        (["--threadsbatch", "-1"], "threadsbatch")):
        with pytest.raises(ConfigError, match=words):
            load_config(argv)


def paused_beside_a_busy_program(machine: Machine) -> tuple[Machine, CountControl]:
    """A control that ran 50 steps on a quiet machine, then paused (its next decode starts a new stretch of work)
    while a busy program started."""
    control = CountControl(2, load=machine)
    run(control, machine, 50)
    machine.busy = True
    control._last_decode -= 10
    return machine, control


def test_where_a_niced_neighbour_counts_as_load_the_probes_still_keep_the_threads_that_do_better():
    """Linux and Windows leave a niced program's CPU out of the load (it yields the cores); where Windows cannot
    list its processes it counts it. Counted, it
    moves the count down at a request's start, and then only starts probes: two threads are faster beside a loop
    at nice 10, and the probes go back to them and keep them."""
    machine = Machine(busy_means_taken=False)
    machine.busy = True
    control = CountControl(2, load=machine, longest_interval=256)
    costs = {1: 0.012, 2: 0.009}
    counts = []
    for _ in range(3000):
        counts.append(control.count())
        control.record(1, costs[counts[-1]])
    assert control.current == 2 and counts[-1000:].count(1) <= 4 * (1000 // 256 + 1)


def test_a_new_request_after_a_pause_starts_from_the_cores_left_free():
    """Busy meanwhile and busy now: fewer threads from the first step, with no step at every thread first (beside a
    busy program it waits at every barrier) and no probe; free again: all of them at once."""
    machine, control = paused_beside_a_busy_program(Machine())
    assert control.count() == 1 and control.sheds == 1
    control.record(1, Machine.COST[True][1])       # still running after the step: one thread it stays
    assert control.count() == 1 and control.probes == 0 and control.returns == 0
    machine.busy = False
    control._last_decode -= 10
    assert control.count() == 2 and control.returns == 1


def test_a_neighbour_that_ends_as_a_request_begins_costs_one_step_at_fewer_threads():
    """Busy over the pause and still running at its end, but gone by the end of the first step (another server's
    reply that just ended): that step runs at one thread, and the instant count read after it gives every thread
    back from the second step on."""
    machine, control = paused_beside_a_busy_program(Machine())
    assert control.count() == 1
    machine.busy = False
    assert run(control, machine, 20) == [1] + [2] * 19
    assert control.sheds == 1 and control.returns == 1 and control.probes == 0


def test_where_the_system_gives_no_instant_count_steps_at_every_thread_decide():
    """Where the system says only how busy the others were over the pause (no instant count): a neighbour that
    ended as the request began is told from one still running by the first steps at every thread, one quiet (the
    threads stay) or two slow (one goes)."""
    machine = Machine()
    machine.running_now = lambda: None
    machine, control = paused_beside_a_busy_program(machine)
    assert control.count() == 2
    machine.busy = False
    assert run(control, machine, 20) == [2] * 20 and control.sheds == 0
    machine.busy = True
    control._last_decode -= 10
    assert run(control, machine, 20) == [2, 2] + [1] * 18 and control.sheds == 1


class SmtMachine:
    """A scripted load on a CPU of 4 cores with two hardware threads each (8 logical CPUs): `busy` programs, each
    taking one hardware thread, over the pause and at the instant."""

    busy_means_taken = True

    def __init__(self, busy: int):
        self.busy = busy

    def others(self) -> float:
        return float(self.busy)

    def niced(self) -> float:
        return 0.0

    def niced_seconds(self) -> float:
        return 0.0

    def running_now(self) -> int:
        return self.busy

    def report(self) -> dict:
        return {"source": "scripted", "busy_means_taken": True}


def test_on_an_smt_cpu_the_load_is_weighed_against_hardware_threads():
    """Four cores worth a thread (the most that run), eight hardware threads: four busy programs leave four of
    them free, so a new request keeps its four threads (weighed against the cores it would shed to one); six
    leave two; prompt chunks run one past the hardware threads only once all eight are taken."""
    machine = SmtMachine(0)
    gov = ThreadGovernor(4, load=machine, past_cores=True, cpus=8)
    assert gov.report()["logical_cpus"] == 8 and gov.generation.most == 4
    for busy, threads in ((4, 4), (6, 2), (8, 1), (0, 4)):
        machine.busy = busy
        gov.generation._last_decode -= 10           # a new request after a pause
        assert gov.count(1) == threads, busy
        gov.record(1, 0.01)
    machine.busy = 8
    gov.generation._last_decode -= 10
    assert gov.count(1) == 1 and gov.count(512) == 9
    machine.busy = 7
    assert gov.count(512) == 1
    # A machine without SMT: the hardware threads are the cores (the default).
    assert ThreadGovernor(4, load=machine).report()["logical_cpus"] == 4


def test_with_no_quiet_cost_known_the_readings_decide_at_once():
    machine = Machine()
    machine.busy = True
    control = CountControl(2, load=machine)
    control._last_decode = -100.0                  # a first request, with nothing measured yet
    assert control.count() == 1 and control.sheds == 1


def test_a_pause_busy_only_until_its_end_keeps_the_threads():
    """Another server's request ran during the pause and ended: busy over the pause, nothing running now."""
    machine = Machine()
    control = CountControl(2, load=machine)
    run(control, machine, 50)
    machine.running_now = lambda: 0
    machine.busy = True
    control._last_decode -= 10
    assert control.count() == 2 and control.sheds == 0


def test_a_request_after_busy_programs_gave_way_to_a_niced_one_starts_at_every_core():
    """Shed beside a busy program that ended during the pause, while one at nice 10 started: over the pause the
    readings still say a core is taken (their average holds the busy one, the instant count holds the niced one),
    but niced programs yield the cores, so the request starts at every thread and keeps them while its steps cost
    what they cost quietly. (Before, it ran at one thread until a probe, 16 steps or more, brought the other back.)"""
    machine, control = shed_beside_a_busy_program(50)
    assert control.current == 1
    machine.busy, machine.others, machine.running_now, machine.niced_cores = False, lambda: 1.0, lambda: 1, 0.5
    control._last_decode -= 10
    assert run(control, machine, 20) == [2] * 20 and control.current == 2 and control.probes == 1


def test_a_niced_program_that_started_late_in_a_long_pause_is_seen():
    """Shed beside busy programs that ran most of a 90 s pause and ended; a program at nice 10 started 1.5 s before
    the next request: a sixtieth of a core over the pause, under NICED_SEEN, but 1.5 CPU seconds. The request
    starts at every thread (bench_neighbours, before: a single stream ran at one thread to its end, the average
    holding the busy programs, the instant count the niced one). With a tick or two of niced time, the pause's
    readings decide as before."""
    machine, control = shed_beside_a_busy_program(50)
    machine.busy, machine.others, machine.running_now = False, lambda: 1.3, lambda: 1
    machine.niced_cores, machine.reading_seconds = 1.5 / 90, 90.0
    control._last_decode -= 10
    assert run(control, machine, 20) == [2] * 20 and control.current == 2
    machine, control = shed_beside_a_busy_program(50)
    machine.busy, machine.others, machine.running_now = False, lambda: 1.3, lambda: 1
    machine.niced_cores, machine.reading_seconds = 0.02 / 90, 90.0
    control._last_decode -= 10
    assert run(control, machine, 3) == [1] * 3


def test_a_niced_program_seen_over_the_pause_costs_two_steps_where_the_cores_are_taken():
    """The same readings with a program at normal priority still running: the first two steps at every thread are
    slow, and the count is back at one from the third step on. Without niced programs seen, no step is tried."""
    machine, control = shed_beside_a_busy_program(50)
    machine.niced_cores = 0.5
    control._last_decode -= 10
    assert run(control, machine, 20) == [2, 2] + [1] * 18 and control.current == 1
    machine.niced_cores = 0.0
    control._last_decode -= 10
    assert run(control, machine, 20) == [1] * 20


def test_one_slow_first_step_beside_a_niced_program_keeps_the_threads():
    """Beside a program at nice 10 a first step at every thread took 1.3 to 1.9 times a quiet one, and once 22
    times: one slow step followed by a quiet one does not shed. (The slow
    step raises the smoothed cost, so a probe of one thread may follow; it loses, and two stay.)"""
    machine, control = shed_beside_a_busy_program(50)
    sheds = control.sheds
    machine.busy, machine.others, machine.running_now, machine.niced_cores = False, lambda: 1.0, lambda: 1, 0.5
    control._last_decode -= 10
    assert control.count() == 2
    control.record(1, 22 * Machine.COST[False][2])
    counts = run(control, machine, 40)
    assert counts[:5] == [2] * 5 and control.sheds == sheds and control.current == 2


def test_a_shed_at_a_requests_start_waits_before_probing_for_more():
    """After a long quiet stretch (no probes: the steps since the last one pile up), a request beside a busy
    program sheds from its first step; the next steps at one thread do not start at once the probe for more that
    the longest wait allows (before, one step at two threads came right after the shed)."""
    machine = Machine()
    control = CountControl(2, load=machine)
    run(control, machine, 2000)
    assert control.probes == 0
    machine.busy = True
    control._last_decode -= 10
    assert run(control, machine, 100) == [1] * 100
    assert control.sheds == 1 and control.probes == 0


def test_a_busy_program_read_as_less_than_a_core_starts_no_probe_while_it_still_runs():
    """A busy loop that our own threads pushed off its core for part of a reading shows as 0.6 of a core; the
    instant count still shows it running, so no step at two threads is tried (each waits at every barrier)."""
    machine, control = shed_beside_a_busy_program(50)
    probes = control.probes
    machine.others = lambda: 0.6
    assert run(control, machine, 60) == [1] * 60 and control.probes == probes
    # Gone for real (nothing running now either): the probe finds two threads faster and keeps them.
    machine.busy, machine.others = False, lambda: 0.0
    back = run(control, machine, 60)
    assert control.current == 2 and back.index(2) < 30


def test_beside_a_niced_program_the_instant_count_does_not_hold_the_threads_back():
    """Programs at a lower priority run now (the instant count holds them) but yield the cores: where they were
    seen, the average alone decides, and two threads, faster beside them, come back within a probe."""
    machine, control = shed_beside_a_busy_program(50)
    machine.busy, machine.running_now, machine.niced_cores = False, lambda: 1, 0.5
    back = run(control, machine, 60)
    assert control.current == 2 and back.index(2) < 30
