"""Several choices for one request (OpenAI's `n`). The first choice reads the prompt; the others start once it has
been read, so that the engine finds the prompt's cells ready: a slot of their own borrows them from the first's
(llama.cpp's llama_memory_seq_cp, engine/kv_pool.py), or with one slot each finds them in the slot's cache after
the one before. Each choice draws from a seed of its own (the request's seed + its index, else a fresh one); a
hang-up or an error cancels them all."""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Iterator

from ..generation import GenerationRequest
from ..jobs import Job
from .reply import ErrorEvent, ReplyEvent, ReplyReader

MAX_CHOICES = 8          # choices in one request: each holds a slot or a place in the queue


def choice_request(request: GenerationRequest, index: int) -> GenerationRequest:
    """The request of choice `index`: its own seed, and no genkey (the first choice's job answers for the request)."""
    seed = request.sampler.seed
    sampler = dataclasses.replace(request.sampler, seed=seed + index if seed >= 0 else -1)
    return dataclasses.replace(request, sampler=sampler, genkey="", next_turn=None)


class Choices:
    """The jobs of one request's `n` choices. The route starts the first (through its Request, which watches the
    client's connection), the rest start when its prompt has been read; `reader` makes each job's ReplyReader."""

    def __init__(self, req, request: GenerationRequest, n: int, reader: Callable[[Job], ReplyReader]):
        self.req, self.request, self.n, self.reader = req, request, n, reader
        self.jobs = [req.start_generation(request)]        # the choices that started, the first first
        self.by_index: dict[int, Job] = {0: self.jobs[0]}
        self._lock = threading.Lock()
        self._rest_started = False

    @property
    def first(self) -> Job:
        return self.jobs[0]

    def start_rest(self) -> list[tuple[int, Job | None, Exception | None]]:
        """Start choices 1..n-1 once (not if the first was cancelled): (index, job or None, the error)."""
        with self._lock:
            if self._rest_started:
                return []
            self._rest_started = True
        started = []
        for index in range(1, self.n):
            if self.first.cancelled.is_set():
                started.append((index, None, RuntimeError("the request was cancelled")))
                continue
            try:
                job = self.req.use().start_generation(choice_request(self.request, index))
            except Exception as e:      # the queue filled up meanwhile: this choice fails, the others stand
                started.append((index, None, e))
                continue
            self.first.linked.append(job)
            if self.first.cancelled.is_set():
                job.cancel()
            self.jobs.append(job)
            self.by_index[index] = job
            started.append((index, job, None))
        return started

    def whole(self) -> list[list[ReplyEvent]]:
        """Every choice's events once all have ended (a choice that could not start fails the request)."""
        self.first.buffer.wait_prompt_read()
        failed = [error for _, job, error in self.start_rest() if job is None]
        if failed:
            self.first.cancel()
            raise failed[0]
        return [self.reader(job).whole() for job in self.jobs]

    def stream(self, ping_seconds: float | None) -> Iterator[tuple[int, list[ReplyEvent]]]:
        """(choice index, events) as each choice's reader yields them, interleaved, until every choice has ended."""
        out: queue.Queue = queue.Queue()

        def follow(index: int, job: Job):
            try:
                for events in self.reader(job).stream(ping_seconds):
                    out.put((index, events))
            finally:
                out.put((index, None))

        def start_rest():
            self.first.buffer.wait_prompt_read()
            for index, job, why in self.start_rest():
                if job is None:
                    out.put((index, [ErrorEvent(f"this choice could not start: {why}")]))
                    out.put((index, None))
                else:
                    threading.Thread(target=follow, args=(index, job), daemon=True).start()
        threading.Thread(target=follow, args=(0, self.first), daemon=True).start()
        threading.Thread(target=start_rest, daemon=True).start()
        ended = 0
        while ended < self.n:
            index, events = out.get()
            if events is None:
                ended += 1
            else:
                yield index, events
