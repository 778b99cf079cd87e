"""The scheduler on its own, with a fake engine (issue 14), and fairness between clients on the real server."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

from tests.harness import in_thread, result_of
from koboldlite.generation import GenerationRequest
from koboldlite.errors import Failed, ModelLoadError, QueueFull
from koboldlite.jobs import Job, StopReason
from koboldlite.scheduler import Scheduler


class FakeEngine:
    """The engine's interface to the scheduler. A job runs until the test finishes it; admission
    can be held at a gate to show what it blocks."""

    def __init__(self, n_slots: int = 1):
        self.n_slots = n_slots
        self.admitted: list[Job] = []
        self.running: list[Job] = []
        self.to_finish: list[Job] = []
        self.fail_admission: set[int] = set()
        self.admission_gate = threading.Event()
        self.admission_gate.set()
        self.admitting = threading.Event()      # the loop has entered admit()
        self.cond = threading.Condition()
        self.closing = False
        self.kept_ahead = threading.Event()

    def ready_on_this_thread(self):
        pass

    def keep_ahead(self):
        self.kept_ahead.set()

    def admit(self, job: Job) -> bool:
        self.admitting.set()
        self.admission_gate.wait()
        if job.id in self.fail_admission:
            raise RuntimeError("no such sampler")
        with self.cond:
            self.admitted.append(job)
            self.running.append(job)
            self.cond.notify_all()
        return True

    def step(self) -> list[Job]:
        with self.cond:
            self.cond.wait_for(lambda: self.closing or self.to_finish or any(j.cancelled.is_set() for j in self.running))
            ended = [j for j in self.running if j.cancelled.is_set() or j in self.to_finish]
            for job in ended:
                self.running.remove(job)
                job.end(StopReason.ABORTED if job.cancelled.is_set() else StopReason.END)
            self.to_finish = [j for j in self.to_finish if j not in ended]
            return ended

    def finish(self, job: Job):
        with self.cond:
            self.to_finish.append(job)
            self.cond.notify_all()

    def wait_admitted(self, n: int):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.admitted) >= n, timeout=10), self.admitted

    def abort_all(self):
        with self.cond:
            ended, self.running = self.running, []
            for job in ended:
                job.end(StopReason.ABORTED)
            self.cond.notify_all()
            return ended

    def fail_all(self, error):
        return self.abort_all()


def job(client: str = "a", genkey: str = "", kobold: bool = False) -> Job:
    return Job(GenerationRequest(prompt="x", client=client, genkey=genkey, checkable_without_genkey=kobold), [1], 4)


@pytest.fixture
def sched():
    engine = FakeEngine()
    finished: list[Job] = []
    s = Scheduler(engine, max_waiting=8, on_finished=finished.append)
    s.finished = finished
    s.start()
    yield s, engine
    with engine.cond:
        engine.closing = True
        engine.cond.notify_all()
    engine.admission_gate.set()
    s.stop()


def test_the_queue_takes_turns_between_clients(sched):
    s, engine = sched
    first = s.submit(job("a"))
    engine.wait_admitted(1)
    a1, a2, a3, b1 = s.submit(job("a")), s.submit(job("a")), s.submit(job("a")), s.submit(job("b"))
    assert [s.queue_position(j) for j in (a1, b1, a2, a3)] == [1, 2, 3, 4]
    for n, running in enumerate((first, a1, b1, a2), start=2):
        engine.finish(running)
        engine.wait_admitted(n)
    assert engine.admitted == [first, a1, b1, a2, a3]


def test_every_end_is_recorded_once_whatever_ended_it(sched):
    s, engine = sched
    running = s.submit(job(genkey="run"))
    engine.wait_admitted(1)
    queued = s.submit(job(genkey="queued"))
    assert s.abort("queued") is queued and queued.buffer.stop_reason is StopReason.ABORTED
    engine.fail_admission.add(s.submit(job(genkey="bad")).id)
    engine.finish(running)
    with s._cond:
        assert s._cond.wait_for(lambda: len(s.finished) == 3, timeout=10)
    assert [j.genkey for j in s.finished] == ["queued", "run", "bad"]
    assert [j.buffer.stop_reason for j in s.finished] == [StopReason.ABORTED, StopReason.END, StopReason.FAILED]
    assert s.idle


def test_stopping_ends_a_running_job_and_the_loop(sched):
    s, engine = sched
    running = s.submit(job())
    engine.wait_admitted(1)
    with engine.cond:
        engine.closing = True        # its step returns at once from now on, as a real one does after each decode
        engine.cond.notify_all()
    s.stop()
    assert running.buffer.stop_reason is StopReason.ABORTED and not s._thread.is_alive()


def test_an_idle_loop_keeps_its_slots_conversations_ahead(sched):
    """After work, once idle for KEEP_AHEAD_AFTER, the loop has the engine keep its idle slots' conversations."""
    s, engine = sched
    s.KEEP_AHEAD_AFTER = 0.01
    done = s.submit(job())
    engine.wait_admitted(1)
    assert not engine.kept_ahead.is_set()          # never while a job runs
    engine.finish(done)
    assert engine.kept_ahead.wait(10) and done.buffer.stop_reason is StopReason.END


def test_a_check_without_genkey_sees_only_a_queued_or_running_job(sched):
    s, engine = sched
    unkeyed = s.submit(job(kobold=True))
    assert s.find("") is unkeyed
    engine.wait_admitted(1)
    assert s.find("") is unkeyed
    engine.finish(unkeyed)
    unkeyed.buffer.wait_done(10)
    with s._cond:
        assert s._cond.wait_for(lambda: s._last_unkeyed is None, timeout=10)   # the end is recorded
    assert s.find("") is None
    assert s.abort("") is None


def test_admission_runs_outside_the_schedulers_lock(sched):
    s, engine = sched
    engine.admission_gate.clear()
    held = s.submit(job("a"))
    assert engine.admitting.wait(10)              # the loop is now inside admit(), building samplers
    # Meanwhile request threads are answered: a submit, the queue length, /health's question.
    other = result_of(in_thread(s.submit, job("b")), timeout=10)
    assert result_of(in_thread(lambda: (s.waiting, s.saturated)), timeout=10) == (1, False)
    engine.admission_gate.set()
    engine.wait_admitted(1)
    assert engine.admitted == [held] and s.queue_position(other) == 1


def test_a_full_queue_is_busy(sched):
    s, engine = sched
    s.submit(job())
    engine.wait_admitted(1)
    for _ in range(8):
        s.submit(job())
    assert s.saturated
    with pytest.raises(QueueFull):
        s.submit(job())



class LoopDefect(BaseException):
    """Something no handler in the loop expects (a defect of ours, not a request's failure)."""


def test_an_engine_that_cannot_get_ready_fails_the_start_not_a_later_request():
    engine = FakeEngine()

    def not_ready():
        raise RuntimeError("decode of 64 tokens into a batch of 16")
    engine.ready_on_this_thread = not_ready
    with pytest.raises(ModelLoadError, match="could not start: decode of 64"):
        Scheduler(engine, max_waiting=8).start()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loop_that_dies_fails_every_job_and_request_at_once():
    engine = FakeEngine()
    finished: list[Job] = []
    s = Scheduler(engine, max_waiting=8, on_finished=finished.append)
    s.start()
    first = s.submit(job("a"))
    engine.wait_admitted(1)
    second = s.submit(job("b"))
    third_queued = threading.Event()

    def defective_step():
        third_queued.wait(10)
        raise LoopDefect("a defect in the loop")
    engine.step = defective_step       # the step under way (the first job's) is the old one
    engine.finish(first)
    engine.wait_admitted(2)
    third = s.submit(job("c"))
    third_queued.set()
    s._thread.join(10)
    assert not s._thread.is_alive() and first.buffer.stop_reason is StopReason.END
    for j in (second, third):          # running and queued when it died: each told why, at once
        assert j.buffer.wait_done(10) and j.buffer.stop_reason is StopReason.FAILED
        assert "a defect in the loop" in j.buffer.error and j in finished
    with pytest.raises(Failed, match="generation loop stopped"):
        s.submit(job("d"))
    with pytest.raises(Failed, match="generation loop stopped"):
        s.call(lambda engine: None)


# -- on the real server --------------------------------------------------------------------------

def post_from(server, source: str, path: str, body: dict, timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_one_address_cannot_hold_every_connection(make_server, tmp_path):
    cfg = tmp_path / "k.json"
    cfg.write_text(json.dumps({"max_connections_per_client": 4}))
    s = make_server("--config", str(cfg), tls=False)
    held = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(4)]
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected, OSError)):
        post_from(s, "127.0.0.1", "/api/extra/tokencount", {"prompt": "x"}, timeout=10)
    # Another address on the LAN is still served, and the first one again once its connections close.
    assert post_from(s, "127.0.0.2", "/api/extra/tokencount", {"prompt": "x"})[0] == 200
    for sock in held:
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""       # the server has closed its end, so it has let the connection go
        sock.close()
    s.json("GET", "/health")
    assert post_from(s, "127.0.0.1", "/api/extra/tokencount", {"prompt": "x"})[0] == 200


def test_the_real_queue_takes_turns_between_addresses(make_server):
    s = make_server(tls=False)
    long = {"prompt": "A long story:", "max_length": 1500, "ban_eos_token": True, "genkey": "runner"}
    runner = in_thread(post_from, s, "127.0.0.1", "/api/v1/generate", long, 300)
    mark = s.mark()
    s.wait_for_line(r"genkey runner", start=0)
    waiting = []
    for key, source in (("a1", "127.0.0.1"), ("a2", "127.0.0.1"), ("a3", "127.0.0.1"), ("b1", "127.0.0.3")):
        waiting.append(in_thread(post_from, s, source, "/api/v1/generate",
                                 {"prompt": "Hi", "max_length": 2, "genkey": key}))
        s.wait_for_line(rf"genkey {key}, queued", start=mark)
    positions = {key: s.json("POST", "/api/extra/generate/check", {"genkey": key})["results"][0]["queue_position"]
                 for key in ("a1", "a2", "a3", "b1")}
    assert positions == {"a1": 1, "b1": 2, "a2": 3, "a3": 4}
    assert s.json("POST", "/api/extra/abort", {"genkey": "a3"})["success"] == "true"      # out of the queue
    assert s.json("POST", "/api/extra/abort", {"genkey": "runner"})["success"] == "true"  # while it runs
    for q in waiting + [runner]:
        assert result_of(q, 120)[0] == 200
    metrics = s.request("GET", "/metrics")[2].decode()
    assert "koboldlite_requests_aborted_total 2" in metrics        # the queued abort is counted too
