"""How many CPU threads each decode runs: one per physical core on a quiet machine (cpu_topology.py), fewer while
other programs take them.

llama.cpp's threads wait for each other after every operation; a thread that has lost its core to another program
holds up all the others. On this project's 2-core machine, beside one busy program, one thread generates at 0.7 of
the quiet two-thread speed where two threads fall to a fifth of it (bench/results/neighbours.md). So the count is
measured, not guessed: each decode's cost is timed, a count whose steps have grown slower than they were on a
quiet machine is compared, over a few steps, with one a little lower, and the faster one kept; while fewer threads
run, a few steps at a higher count now and then find out whether the cores are free again. A probe that loses is
tried again after twice as long (and ends at its first step if that step already cost twice the current count's),
so a settled machine pays for almost no probes, and the other programs' CPU use
(SystemLoad: their average over a reading, and those running at the instant) keeps the loop from probing a
higher count while no core is free for it.

Who calls what: the Engine asks ThreadGovernor.count(n) before each decode of n tokens, sets that count in llama.cpp
(llama_set_n_threads costs nothing: it is read when the next graph runs), and reports the decode's seconds with
record(n, seconds). Generation steps have a CountControl; prompt reading runs at the count it has found (no timing
of its own), or one past the cores while other programs take them all (ThreadGovernor.count_past_cores), unless
--threadsbatch or --threads fixes one.
"""

from __future__ import annotations

import dataclasses
import enum
import statistics
import time

from .cpu_topology import math_cores
from .system_load import SystemLoad


class ThreadMode(enum.Enum):
    ADAPTIVE = "adaptive"      # the count follows the machine (no --threads)
    FIXED = "fixed"            # --threads / --threadsbatch: always that count
    FOLLOWING = "following"    # prompt reading without either: the generation count in force


def most_threads(threads: int) -> int:
    """--threads as given, else one per core that is worth one (cpu_topology.math_cores): what a context is made
    with, and the most a decode runs."""
    return threads or math_cores()


@dataclasses.dataclass
class Probe:
    """A few steps at another count, then as many at the current one: two fresh sets of costs, compared."""
    count: int
    bucket: int
    blind: bool             # made whatever the readings say (CountControl._blind)
    tried: list[float] = dataclasses.field(default_factory=list)      # the other count's steps
    baseline: list[float] = dataclasses.field(default_factory=list)   # the current count's, right after
    steps: int = 0


class CountControl:
    """One thread count that adapts (see the module's docstring), or stays fixed.

    Costs are kept per (count, bucket): a bucket groups decodes of like size (a step of one token, of four, a
    prompt chunk of 512), whose costs can be compared; `quiet` is the lowest smoothed cost seen, what a step of
    that size costs with that many threads when nothing else runs. What starts a probe: steps dearer than quiet,
    or other programs using the cores this count needs (fewer threads may do better); or a core free for more
    (more may); or, rarely, nothing. What decides it is only the two fresh sets of step costs."""

    SLOW = 1.5            # a step this much dearer than its quiet cost: the CPU is contended
    GAIN = 0.95           # a probed count is taken when its steps cost at most this share of the current count's
    ALPHA = 0.25          # weight of a new sample in the smoothed cost
    SLACK = 0.75          # cores of other programs' use taken as noise (a client on this machine, say)
    IDLE_GAP = 0.5        # seconds without a decode: the next one starts a new stretch of work
    NICED_SEEN = 0.02     # cores of niced programs over a pause (a tick of 10 ms in 0.5 s): some may run at its end
    NICED_SECONDS = 0.1   # or CPU seconds of them over it: over a 90 s pause, one started 1.5 s before its end: 0.017
    ABANDON = 2.0         # a probed step this much dearer than the current count's smoothed cost ends the probe
    DOUBT_STEPS = 2       # slow steps that confirm a doubted shed: first steps beside a niced program took 1.3 to
                          # 1.9 times quiet, once 22, where every step beside a busy one is slow
    BLIND_LONGEST = 8     # blind probes that keep failing wait up to this many longest waits

    def __init__(self, most: int, fixed: int = 0, probe_steps: int = 4, first_interval: int = 16,
                 longest_interval: int = 1024, load: SystemLoad | None = None, cpus: int = 0):
        """`most`: the cores worth a thread (cpu_topology.math_cores); `cpus`: the hardware threads they and their
        SMT siblings make (logical_cpus; 0: as many as `most`), which the other programs' load is weighed
        against: a busy program on one of a core's two hardware threads leaves the other free for a thread."""
        self.mode = ThreadMode.FIXED if fixed else ThreadMode.ADAPTIVE
        self.most = fixed or most
        self.cpus = max(cpus, self.most)
        self.current = self.most
        self.probe_steps, self.first_interval, self.longest_interval = probe_steps, first_interval, longest_interval
        self.interval = first_interval       # steps to wait before the next probe while nothing changes
        self._blind_interval = longest_interval  # steps to wait before the next blind one (see _blind)
        self.since_probe = 2 * probe_steps
        self.cost: dict[tuple[int, int], float] = {}
        self.quiet: dict[tuple[int, int], float] = {}
        self.samples: dict[tuple[int, int], int] = {}
        self.probe: Probe | None = None
        self._running = self.current        # the count the decode under way was given
        self._last_decode = 0.0             # monotonic time of the last count() (0: none yet)
        self.situation = (False, False)      # (fewer may do better, more may), as settled
        self._held = 0                       # steps another situation has held
        self.load = load
        self.sheds = self.returns = self.probes = 0
        self._doubted_shed: int | None = None   # a count a pause's readings proposed, until steps confirm it
        self._doubt_steps = self._doubt_slow = 0
        self._recheck = False                   # a shed at a request's start: read the instant count after a step

    def count(self) -> int:
        """The count the next decode runs with. The first decode after a pause (a new request on an idle server)
        starts from what the other programs did meanwhile: as many threads as they left cores free."""
        self._decode_begins()
        p = self.probe
        if p and len(p.tried) < self.probe_steps and p.steps < 2 * self.probe_steps:
            self._running = p.count
        else:
            self._running = self.current
        return self._running

    def in_force(self) -> int:
        """The count for a decode this control does not time (a prompt chunk): the one in force, after a pause's
        readings as count() takes them; never a probe's."""
        self._decode_begins()
        return self.current

    def untimed_decode_ended(self):
        """A decode at in_force()'s count has ended (a prompt chunk): a shed at a request's start reads the instant
        count again. No probe finds out whether more threads would do there (one costs a whole chunk), so while
        fewer run the readings decide alone: more once both the others' average and the instant count leave the
        cores free (a busy program pushed off its core by our threads shows in the second)."""
        if self._recheck:
            self._read_again()
        elif self.mode is ThreadMode.ADAPTIVE and self.load is not None:
            others, up = self.load.others(), self._step_from(self.current)[1]
            if self.current < self.most and self._room_for(up, others):
                self.probe = None       # one under way times no chunk: it would hold the count until steps resume
                self._set_count(up)

    def _read_again(self):
        if self._recheck:
            self._recheck = False
            now = self.load.running_now()
            free = None if now is None else min(self.most, self.cpus - now)
            if free is not None and free > self.current:
                self._set_count(free)

    def _decode_begins(self):
        now = time.monotonic()
        if self.mode is ThreadMode.ADAPTIVE and self.probe is None and now - self._last_decode > self.IDLE_GAP:
            self._resume()
        self._last_decode = now

    def _resume(self):
        """How busy the others were over the pause says little of now when they stopped at its end (another
        request served, a build finished): the count follows the lesser of that and what runs at this instant."""
        if self.load is None or self.most == 1:
            return
        self._doubted_shed, self._recheck = None, False
        average, now = self.load.others(), self.load.running_now()
        others = now if average is None else average if now is None else min(average, now)
        if others is None:
            return
        target = max(1, min(self.most, round(self.cpus - others)))
        niced_seen = self._niced_seen()
        if target <= self.current < self.most and niced_seen and self._quiet_known(self.most):
            # Programs at a lower priority ran meanwhile, and neither reading tells them apart when the others
            # stopped near the pause's end (its average holds them, the instant count holds the niced ones): niced
            # ones yield the cores, so every thread again, and fewer once steps confirm that they are taken.
            self._set_count(self.most)
        if target < self.current and (now is None or niced_seen) and self._quiet_known(self.current):
            # No instant count that can be trusted to say a neighbour still runs (none on this system; niced ones
            # in it yield the cores): fewer only once steps at the current count confirm that its cores are taken.
            self._doubted_shed, self._doubt_steps, self._doubt_slow = target, 0, 0
        else:
            # A neighbour whose work ended as this began (another server's reply, a build's last step) may still
            # show running for a moment: the instant count is read again after the first decode, whenever it
            # runs at fewer threads (kept from before the pause too). That decode costs 1.5 times a quiet step
            # where it was wrong (a prompt chunk nearly twice); one at every thread beside a busy program waits
            # at every barrier (3 to 10 times a step at one thread) in each request it starts.
            self._recheck = target < self.most
            if target != self.current:
                self._set_count(target)

    def _niced_seen(self) -> bool:
        """Whether programs at a lower priority ran over the last reading, so that some may be what the instant
        count counts: a share of a core, or (over a long pause) some CPU seconds in all."""
        niced, seconds = self.load.niced(), self.load.niced_seconds()
        return niced is not None and (niced >= self.NICED_SEEN or (seconds or 0.0) >= self.NICED_SECONDS)

    def _quiet_known(self, count: int) -> bool:
        """Whether steps at this count have a quiet cost yet (of any size): a step can then confirm a doubt."""
        return any(c == count for c, _ in self.quiet)

    def _set_count(self, count: int):
        """A new count, from the readings or a probe that won: its probes wait from now (the steps counted before
        were at the old one, and the longest wait must not fire at once: beside a busy program, a probe for more
        right after the shed)."""
        if count < self.current:
            self.sheds += 1
        else:
            self.returns += 1
        self.current, self.interval, self.since_probe = count, self.first_interval, 0
        self._blind_interval = self.longest_interval

    def record(self, bucket: int, seconds: float):
        """A decode of this bucket ran at the count count() gave and took this long."""
        if self.mode is ThreadMode.FIXED:
            return
        count = self._running
        key = (count, bucket)
        n = self.samples[key] = self.samples.get(key, 0) + 1
        smoothed = self.cost[key] = seconds if n == 1 else self.cost[key] + self.ALPHA * (seconds - self.cost[key])
        if n >= 3:
            self.quiet[key] = min(self.quiet.get(key, smoothed), smoothed)
        self._read_again()
        if self._doubted_shed is not None:
            self._doubt_steps += 1
            comparable = key in self.quiet
            slow = not comparable or seconds > self.SLOW * self.quiet[key]
            self._doubt_slow += comparable and slow
            if not slow or self._doubt_slow >= self.DOUBT_STEPS or self._doubt_steps >= self.probe_steps:
                # A comparable step as fast as quiet ends the doubt; DOUBT_STEPS slow ones (the cores are taken), or
                # too few comparable steps, and the readings stand.
                if slow:
                    self._set_count(self._doubted_shed)
                self._doubted_shed = None
        if self.probe:
            self._probe_step(count, bucket, seconds)
        else:
            self.since_probe += 1
            self._maybe_probe(bucket)

    def _maybe_probe(self, bucket: int):
        c, key = self.current, (self.current, bucket)
        if self.most == 1:
            return
        down, up = self._step_from(c)
        others = self.load.others() if self.load else None
        slow = key in self.quiet and self.cost[key] > self.SLOW * self.quiet[key]
        crowded = others is not None and others > self.cpus - c + self.SLACK
        # Others' use alone proposes fewer only while no quiet cost is known: once one is, steps no slower than
        # quiet mean the threads are not waiting on a taken core (the reading may be the tail of work that ended).
        fewer = c > 1 and (slow or (crowded and key not in self.quiet))
        more = c < self.most and self._room_for(up, others)
        changed = self._settled((fewer, more))
        fewer, more = self.situation
        if self.since_probe < (2 * self.probe_steps if changed else self.interval):
            return
        if fewer:
            self._start_probe(down, bucket)
        elif more:
            self._start_probe(up, bucket)
        elif self.since_probe >= self._blind_interval and self._blind(others):
            self._start_probe(down if c == self.most else up, bucket, blind=True)

    def _blind(self, others: float | None) -> bool:
        """Whether probes are made now and then whatever the readings say: where the system does not tell the
        other programs' load, or, while fewer threads run, where busy time it tells of may leave the cores free
        (SystemLoad.busy_means_taken). Not where it means them taken: such a probe beside busy programs costs a
        step that waits at every barrier (up to 3 s on this project's 2-core machine beside two busy loops, whose
        2,000-token streams ran 1.08 times as fast without these probes), and the readings say when the cores
        are free again."""
        if others is None:
            return True
        return self.current < self.most and not self.load.busy_means_taken

    def _step_from(self, count: int) -> tuple[int, int]:
        """The counts a probe from `count` tries: a quarter fewer or more, at least one thread."""
        step = max(1, count // 4)
        return max(1, count - step), min(self.most, count + step)

    def _room_for(self, count: int, others: float | None) -> bool:
        """Whether the other programs leave `count` hardware threads free: over the last reading (less a client's
        noise, SLACK) and at this instant."""
        return others is not None and others <= self.cpus - count + self.SLACK and self._free_now(count)

    def _free_now(self, count: int) -> bool:
        """Whether the other programs leave `count` hardware threads free at this instant too (True where the system
        does not say): a busy program that our own threads pushed off its core for part of a reading shows as less
        than one core (0.56 to 0.8 of one for a busy loop beside one thread generating, 1 reading in 20), and a
        probe for more then costs a step that waits at every barrier."""
        if self.load is None:
            return True
        if self._niced_seen():
            return True         # the instant count holds niced programs too, and they yield: the average decides
        now = self.load.running_now()
        return now is None or now <= self.cpus - count

    def _settled(self, situation: tuple[bool, bool]) -> bool:
        """Whether the signs have changed and held for a few steps (a reading near a threshold flips back and
        forth: each flip must not start a probe): the backoff starts again then."""
        if situation == self.situation:
            self._held = 0
            return False
        self._held += 1
        if self._held < 2 * self.probe_steps:
            return False
        self.situation, self.interval, self._held = situation, self.first_interval, 0
        return True

    def _start_probe(self, count: int, bucket: int, blind: bool = False):
        self.probe = Probe(count, bucket, blind)
        self.probes += 1

    def _probe_step(self, count: int, bucket: int, seconds: float):
        probe = self.probe
        probe.steps += 1
        failed = False
        if bucket == probe.bucket:
            (probe.tried if count == probe.count else probe.baseline).append(seconds)
            # Failed already, and the next steps would cost as much: more threads than the cores left free wait at
            # every barrier for one the system took away (two threads beside two busy loops: 3 to 10 times a step
            # at one), so the probe that would find it out stops at its first step.
            current = self.cost.get((self.current, bucket))
            failed = count == probe.count and current is not None and seconds > self.ABANDON * current
        if not failed and len(probe.baseline) < self.probe_steps and probe.steps < 4 * self.probe_steps:
            return
        self.probe, self.since_probe = None, 0
        if not failed and probe.tried and probe.baseline and \
                statistics.median(probe.tried) <= self.GAIN * statistics.median(probe.baseline):
            self._set_count(probe.count)
        elif probe.blind:
            # Lost again: the signs it was made against were right, and each costs as much as the last.
            self._blind_interval = min(self.BLIND_LONGEST * self.longest_interval, 2 * self._blind_interval)
        else:
            self.interval = min(self.longest_interval, self.interval * 2)

    def report(self) -> dict:
        return {"mode": self.mode.value, "most": self.most, "now": self.current, "sheds": self.sheds,
                "returns": self.returns, "probes": self.probes}


class ThreadGovernor:
    """The thread counts of one llama context: generation steps' own control; prompt reading runs at the count
    that control has found (or a fixed one)."""

    GENERATION_WIDTH = 16     # a decode of up to this many tokens is a generation step (slots, drafts)

    def __init__(self, most: int, threads: int = 0, threads_batch: int = 0, load=None, past_cores: bool = False,
                 cpus: int = 0):
        """`most`: the cores to use at most; `threads`, `threads_batch`: fixed counts (0: adaptive); `load`: what
        the other programs take (this machine's /proc/stat unless a test simulates one); `past_cores`: the build's
        threads stop spinning at a barrier when there are more of them than cores (an OpenMP build: see
        count_past_cores); `cpus`: the hardware threads the process may run on (0: as many as `most`)."""
        load = SystemLoad() if load is None else load
        self.generation = CountControl(most, fixed=threads, load=load, cpus=cpus)
        # Prompt reading has no probes of its own (one at another count costs a whole chunk): it follows the count
        # generation steps found. Beside busy programs every core costs it as much as it costs them: a prompt of 24
        # to 400 tokens read 1.0 to 2 times slower at two threads than at one beside one or two busy loops (up to
        # 3 s where one thread took 0.3), on a quiet machine 1.9 times faster (bench/README.md, issue 36).
        fixed = threads_batch or threads
        self.batch = CountControl(most, fixed=fixed, load=load, cpus=cpus) if fixed else None
        self.load = load
        self.past_cores = past_cores and not fixed
        self.chunks_past_cores = 0    # prompt chunks read at count_past_cores()
        self.decode_seconds = 0.0     # all decodes' time inside llama.cpp: the rest of a reply's time is ours

    def cores_free(self) -> bool:
        """Whether the other programs left every core of the generation count free over the last reading (False
        where the system does not say): what a measurement that stands for a quiet machine needs (engine/drafting.py's
        step costs), asked by the idle loop. Not the instant count: at that moment it read one other program on a
        quiet machine (right after a decode it does about once in 25), and no thread of ours has pushed a busy
        program off its core over an idle pause (the reason CountControl asks it too)."""
        others = self.load.others()
        return others is not None and others <= self.generation.SLACK

    def count(self, n_tokens: int) -> int:
        if n_tokens <= self.GENERATION_WIDTH:
            return self.generation.count()
        if self.batch:
            return self.batch.count()
        count = self.generation.in_force()
        if self.past_cores and count < self.generation.most and self._every_core_taken():
            self.chunks_past_cores += 1
            return self.count_past_cores()
        return count

    def count_past_cores(self) -> int:
        """A prompt chunk's count while other programs take every core: one more thread than hardware threads (on a
        CPU without SMT, than cores). GNU OpenMP spins at a barrier only while it runs no more threads than the
        hardware threads it was started on (its affinity's CPUs); past them it
        spins a thousand rounds and sleeps, so a thread whose neighbour lost its core hands its own over instead
        of spinning it away, and whichever threads hold a core read the prompt. A 2,000-token prompt on this
        project's 2-core machine beside two busy loops (bench_neighbours, 4 rounds): 123.3 tokens/s against 86.3
        at one thread, llama-server's two 100.9 (bench/README.md). OMP_WAIT_POLICY=PASSIVE does the same, but
        for the whole process, and generation steps lose a third of their quiet speed to it. Not beside one busy
        loop, where one thread has a core to itself and three gained nothing (llama.cpp alone: 122.6 tokens/s
        against 121.0); nor beside niced programs, which yield (three read at 0.86 of their quiet speed, one at
        1.01). Generation steps never run past the cores: at a short step's barrier the sleeping thread's
        wake-up is dearer than its spin."""
        return self.generation.cpus + 1

    def _every_core_taken(self) -> bool:
        """Whether other programs' threads take every core at this instant (running or ready to run): at least
        one per hardware thread. Busy time averaged over a reading cannot say it: beside our own threads two busy
        loops on two cores read as 0.8 to 1.3 cores."""
        now = self.load.running_now()
        return now is not None and now >= self.generation.cpus

    def record(self, n_tokens: int, seconds: float):
        self.decode_seconds += seconds
        if n_tokens <= self.GENERATION_WIDTH:
            self.generation.record(n_tokens, seconds)
        elif self.batch is None:
            self.generation.untimed_decode_ended()

    def report(self) -> dict:
        gen = self.generation
        batch = self.batch.report() if self.batch else {"mode": ThreadMode.FOLLOWING.value, "most": gen.most,
                                                        "now": gen.current, "past_cores": self.past_cores,
                                                        "chunks_past_cores": self.chunks_past_cores}
        return {"generation": gen.report(), "batch": batch, "decode_seconds": round(self.decode_seconds, 4),
                "logical_cpus": gen.cpus, "readings": self.load.report()}
