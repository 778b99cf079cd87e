"""The scheduler: the fair queue in front of an engine, and the generation thread that runs it. It knows an engine
only by the protocol below, and nothing of slots or llama.cpp."""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Iterator, Protocol

from .errors import Failed, ModelLoadError, QueueFull, Unavailable
from .jobs import Job, JobState, StopReason


class GenerationEngine(Protocol):
    """What the scheduler asks of an engine (engine/engine.py's Engine is the one; tests/test_scheduler.py fakes it).
    `n_slots` is read on any thread; every method is called on the generation thread alone."""

    n_slots: int

    def ready_on_this_thread(self) -> None:
        """Once, before the first job, on the thread that will run every step."""

    def admit(self, job: Job) -> bool:
        """Give the job a slot; False when none has room yet (it goes back to the head of the queue)."""

    def step(self) -> list[Job]:
        """One step of every admitted job; the jobs that ended in it (each ended with Job.end)."""

    def keep_ahead(self) -> None:
        """The loop has been idle a while: get ahead of the next requests."""

    def abort_all(self) -> list[Job]:
        """End every admitted job as aborted (the server is stopping)."""

    def fail_all(self, error: str) -> list[Job]:
        """End every admitted job as failed (a step raised)."""


class FairQueue:
    """Waiting jobs, served round-robin across client addresses: one client's burst of requests
    waits behind every other client's next request, not in front of it."""

    def __init__(self):
        self._lines: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def append(self, job: Job):
        self._lines.setdefault(job.client, collections.deque()).append(job)
        self._count += 1

    def popleft(self) -> Job:
        client, line = next(iter(self._lines.items()))
        job = line.popleft()
        del self._lines[client]
        if line:
            self._lines[client] = line          # that client's next request goes to the back
        self._count -= 1
        return job

    def push_front(self, job: Job):
        """Back to the head of the queue (it could not start yet)."""
        self._lines.setdefault(job.client, collections.deque()).appendleft(job)
        self._lines.move_to_end(job.client, last=False)
        self._count += 1

    def remove(self, job: Job):
        line = self._lines[job.client]
        line.remove(job)
        if not line:
            del self._lines[job.client]
        self._count -= 1

    def __iter__(self) -> Iterator[Job]:
        """In the order they will run."""
        lines = [list(line) for line in self._lines.values()]
        for i in range(max(map(len, lines), default=0)):
            yield from (line[i] for line in lines if i < len(line))

    def clear(self) -> list[Job]:
        jobs = list(self)
        self._lines.clear()
        self._count = 0
        return jobs


class Scheduler:
    """The queue in front of the engine, and the thread that runs the generation loop.

    Also the registry of jobs by genkey, for check and abort, and the one place every job's end is
    reported (`on_finished`: the log line, the counts of /metrics), whatever ended it. Request threads see jobs
    only through this object, under its condition; the engine belongs to the generation thread.
    """

    RECENT_KEYED_JOBS = 256
    KEEP_AHEAD_AFTER = 0.5    # seconds idle before the slots' conversations are kept in the prompt cache

    def __init__(self, engine: GenerationEngine, max_waiting: int,
                 on_finished: Callable[[Job], None] = lambda job: None):
        self.engine = engine
        self.on_finished = on_finished
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._queue = FairQueue()
        self._running: list[Job] = []            # admitted, in order of admission
        self._by_genkey: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._last_unkeyed: Job | None = None    # shown to a check without genkey while it runs
        self._stopping = threading.Event()     # the shared abort signal: ends every job
        self._calls: list[tuple[Callable, dict, threading.Event]] = []   # work for the loop thread, between steps
        self._thread = threading.Thread(target=self._run, name="generation-loop", daemon=True)
        self._stepped = False                  # work done since the loop last kept its slots' conversations
        self._broken: BaseException | None = None   # why the loop thread ended on its own: every request fails

    def start(self):
        """Start the loop; return once the engine is ready on it (so a first request finds the loop waiting).
        An engine that cannot get ready raises ModelLoadError here, in the loader's thread, not later in a request."""
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait()
        if self._broken is not None:
            raise ModelLoadError(f"the generation loop could not start: {self._broken}")

    # -- request threads ---------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            self._check_alive()
            if self._full():
                raise QueueFull()
            self._queue.append(job)
            if job.genkey:
                self._by_genkey.pop(job.genkey, None)
                self._by_genkey[job.genkey] = job
                while len(self._by_genkey) > self.RECENT_KEYED_JOBS:
                    self._by_genkey.popitem(last=False)
            elif job.request.checkable_without_genkey:
                self._last_unkeyed = job
            self._cond.notify_all()
        return job

    def call(self, fn: Callable[[GenerationEngine], Any], timeout: float = 120.0) -> Any:
        """Run fn(engine) on the generation thread between two steps (only it may use the llama context), and
        give back what it returns or raises."""
        box: dict = {}
        done = threading.Event()
        with self._cond:
            self._check_alive()
            self._calls.append((fn, box, done))
            self._cond.notify_all()
        if not done.wait(timeout):
            raise Unavailable("the generation loop did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _check_alive(self):
        """Holds _cond. Refuse new work when the loop will not run it: failed (500, with why) or stopping (503)."""
        if self._broken is not None:
            raise Failed(f"the generation loop stopped: {self._broken}")
        if self._stopping.is_set():
            raise Unavailable("the server is shutting down")

    def _run_calls(self):
        with self._cond:
            calls, self._calls = self._calls, []
        for fn, box, done in calls:
            try:
                box["result"] = fn(self.engine)
            except Exception as e:   # handed to the caller
                box["error"] = e
            done.set()

    def _full(self) -> bool:
        return len(self._queue) >= self.engine.n_slots - len(self._running) + self.max_waiting

    def find(self, genkey: str) -> Job | None:
        """The latest job of this genkey; with no genkey, the unkeyed Kobold-API job while it is queued
        or running (old clients poll so during their own blocking generate; after it, the text is
        nobody else's business)."""
        with self._cond:
            return self._by_genkey.get(genkey) if genkey else self._last_unkeyed

    def abort(self, genkey: str) -> Job | None:
        """Abort the job with this genkey, or without one the latest running job that has none
        (SillyTavern's stop button): take it out of the queue, or cancel it."""
        with self._cond:
            job = self._by_genkey.get(genkey) if genkey else self._latest_unkeyed()
            if job is None or job.state is JobState.DONE:
                return None
            if job.state is JobState.QUEUED:
                self._queue.remove(job)
                self._end_unstarted(job, StopReason.ABORTED)
                return job
        job.cancel()
        return job

    def _latest_unkeyed(self) -> Job | None:
        running = [j for j in self._running if not j.genkey]
        if running:
            return running[-1]
        waiting = [j for j in self._queue if not j.genkey]
        return waiting[-1] if waiting else None

    def queue_position(self, job: Job) -> int:
        """1 for the next to run; 0 when not waiting."""
        with self._cond:
            return next((i for i, j in enumerate(self._queue, 1) if j is job), 0)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def saturated(self) -> bool:
        """True when one more request would be refused as busy."""
        with self._cond:
            return self._full()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    def stop(self, timeout: float = 5.0):
        """Abort everything, queued and running, and let the loop thread end."""
        with self._cond:
            self._stopping.set()
            for job in self._queue.clear():
                self._end_unstarted(job, StopReason.ABORTED)
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- every job's end ------------------------------------------------------

    def _end_unstarted(self, job: Job, reason: StopReason, error: str | None = None):
        """A job that never reached the engine (aborted in the queue, or refused by it). Holds _cond."""
        job.end(reason, error)
        self._record([job])

    def _record(self, jobs: list[Job]):
        """Holds _cond. The jobs have ended: forget them as running, and report them."""
        for job in jobs:
            if job in self._running:
                self._running.remove(job)
            if self._last_unkeyed is job:
                self._last_unkeyed = None
            self.on_finished(job)
        self._cond.notify_all()

    # -- the generation thread -----------------------------------------------

    def _run(self):
        """The loop thread's body. Should anything escape the loop itself (a defect, not a request's failure),
        every job and caller hears why at once, rather than waiting on a thread that is gone."""
        try:
            self.engine.ready_on_this_thread()
        except BaseException as e:
            self._broken = e
            return
        finally:
            self._ready.set()
        try:
            self._serve()
        except BaseException as e:
            self._died(e)
            raise

    def _died(self, error: BaseException):
        with self._cond:
            self._broken = error
            why = f"the generation loop stopped: {error}"
            for job in self._queue.clear() + list(self._running):
                if job.state is not JobState.DONE:
                    self._end_unstarted(job, StopReason.FAILED, why)
            for _, box, done in self._calls:
                box["error"] = Failed(why)
                done.set()
            self._calls = []

    def _serve(self):
        engine = self.engine
        while True:
            with self._cond:
                keep_ahead = False
                while not self._stopping.is_set() and not self._queue and not self._running and not self._calls:
                    if not self._stepped:
                        self._cond.wait()
                    elif not self._cond.wait(self.KEEP_AHEAD_AFTER):
                        keep_ahead = True      # idle for a while (a client's next request at once never waits)
                        break
                if self._stopping.is_set():
                    self._record(engine.abort_all())
                    for _, box, done in self._calls:
                        box["error"] = Unavailable("the server is shutting down")
                        done.set()
                    return
            if keep_ahead:
                self._stepped = False
                engine.keep_ahead()
                continue
            if self._calls:
                self._run_calls()
            with self._cond:
                starting = []
                while self._queue and len(self._running) < engine.n_slots:
                    job = self._queue.popleft()
                    job.move(JobState.STARTING)
                    self._running.append(job)
                    starting.append(job)
            for i, job in enumerate(starting):   # outside the condition: samplers and grammars are built here
                try:
                    admitted = engine.admit(job)
                except Exception as e:  # e.g. a sampler llama.cpp refuses: this job fails alone
                    with self._cond:
                        self._end_unstarted(job, StopReason.FAILED, f"could not start the generation: {e}")
                    continue
                if admitted:
                    job.move(JobState.RUNNING)
                    continue
                with self._cond:        # no room yet (a shared KV pool held by running replies)
                    for waiting in reversed(starting[i:]):
                        self._running.remove(waiting)
                        waiting.move(JobState.QUEUED)
                        self._queue.push_front(waiting)
                    if not self._running:    # nothing will free room: never wait on nothing
                        self._queue.remove(job)
                        self._end_unstarted(job, StopReason.FAILED, "the prompt does not fit in the KV cache")
                break
            self._stepped = True
            try:
                ended = engine.step()
            except Exception as e:  # a failure fails the running jobs, never the server
                ended = engine.fail_all(f"generation failed: {e}")
            if ended:
                with self._cond:
                    self._record(ended)
