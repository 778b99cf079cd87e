"""Windows' CPU time of programs below normal priority, told apart from the busy time GetSystemTimes gives, and the
other programs' threads running now (engine/windows_load.py, engine/system_load.py). No Windows machine runs this
suite: the records are laid out here as 64-bit Windows documents them (SYSTEM_PROCESS_INFORMATION, each followed by
its SYSTEM_THREAD_INFORMATION records), and the readings go through the same arithmetic SystemLoad applies on
Windows."""

from __future__ import annotations

import struct
import sys

import pytest

from koboldlite.engine.system_load import Reading, SystemLoad
from koboldlite.engine.windows_load import ProcessList, ProcessTime, process_records

OWN = 4242


def process(pid: int, created: int, seconds: float, priority: int = 8, threads: int = 2,
            runnable: int = 0) -> bytearray:
    """One process's record and its threads' as the system writes them: NextEntryOffset (filled by chain()),
    NumberOfThreads, WorkingSetPrivateSize, HardFaultCount, NumberOfThreadsHighWatermark, CycleTime, CreateTime,
    UserTime, KernelTime (100 ns), ImageName (Length, MaximumLength, 4 bytes padding, Buffer), BasePriority, 4
    bytes padding, UniqueProcessId, and the rest of the 256 bytes (counters, left as noise here); then 80 bytes a
    thread, its ThreadState at 68: the first `runnable` Running, Ready, Standby or DeferredReady (2, 1, 3, 7 in
    turn), the rest Waiting (5), Initialized (0) or Terminated (4), the other fields noise."""
    record = bytearray(b"\xa5" * (256 + 80 * threads))
    user = int(seconds * 1e7 * 0.75)
    struct.pack_into("<IIqIIQqqqHH4xQi4xQ", record, 0, 0, threads, 1 << 20, 3, threads, 10 ** 9, created, user,
                     int(seconds * 1e7) - user, 24, 26, 0x7FF0_0000_0000, priority, pid)
    for i in range(threads):
        struct.pack_into("<I", record, 256 + 80 * i + 68, (2, 1, 3, 7)[i % 4] if i < runnable else (5, 0, 4)[i % 3])
    return record


def chain(*records: bytearray) -> bytes:
    """The records one after another, each NextEntryOffset its own length, the last 0."""
    for record in records[:-1]:
        struct.pack_into("<I", record, 0, len(record))
    struct.pack_into("<I", records[-1], 0, 0)
    return b"".join(records)


def test_the_records_give_each_processs_time_and_priority():
    buffer = chain(process(0, 0, 9000.0, priority=0, threads=4, runnable=4),
                   process(4, 1, 120.5, priority=8, threads=150, runnable=5),
                   process(700, 2, 33.25, priority=6, threads=1), process(900, 3, 2.0, priority=4, threads=0))
    assert process_records(buffer) == [ProcessTime(0, 0, 9000.0, 0, 4), ProcessTime(4, 1, 120.5, 8, 5),
                                       ProcessTime(700, 2, 33.25, 6, 0), ProcessTime(900, 3, 2.0, 4, 0)]


def test_records_that_do_not_chain_give_no_reading():
    """A record or its threads cut short, or an offset into the middle of a record or its threads: not a layout
    this knows."""
    whole = chain(process(4, 1, 1.0), process(700, 2, 2.0))
    assert process_records(whole[:-10]) is None and process_records(whole[:300]) is None
    for offset in (100, 256 + 80):                   # inside the first record; inside its threads
        broken = bytearray(whole)
        struct.pack_into("<I", broken, 0, offset)
        assert process_records(bytes(broken)) is None
    assert process_records(b"") is None


def snapshots(*lists):
    """A query that gives these process lists, one a call."""
    buffers = iter([chain(*(process(*p) for p in ps)) if ps is not None else None for ps in lists])
    return lambda: next(buffers)


def test_lower_priority_time_adds_what_each_such_process_used_since_the_last_reading():
    processes = ProcessList(query=snapshots(
        # pid, created, seconds, priority
        [(0, 0, 500.0, 0), (10, 1, 50.0, 6), (11, 1, 80.0, 8), (12, 1, 5.0, 8), (OWN, 1, 7.0, 6)],
        # 10 used 2 s below normal; 11 used 3 s at normal (not counted); 12 went below normal (its 1 s since);
        # this process's own 4 s are not counted; 13 started below normal with 0.5 s; the idle process's time is
        # not a program's
        [(0, 0, 510.0, 0), (10, 1, 52.0, 6), (11, 1, 83.0, 8), (12, 1, 6.0, 6), (OWN, 1, 11.0, 6),
         (13, 2, 0.5, 4)],
        # 10 ended; its id came back as a new process at normal priority; 13 used 0.25 s more
        [(0, 0, 515.0, 0), (10, 3, 1.0, 8), (12, 1, 6.0, 6), (13, 2, 0.75, 4)],
        None), own_pid=OWN)
    assert processes.lower_priority_seconds() == 0.0
    assert processes.lower_priority_seconds() == pytest.approx(2.0 + 1.0 + 0.5)
    assert processes.lower_priority_seconds() == pytest.approx(3.5 + 0.25)
    assert processes.lower_priority_seconds() is None


def test_the_threads_running_now_are_the_other_programs_at_any_priority():
    """The idle process's threads (one running on each idle core) and this process's own are left out."""
    processes = ProcessList(query=snapshots(
        [(0, 0, 500.0, 0, 8, 6), (10, 1, 5.0, 8, 40, 3), (11, 1, 5.0, 6, 12, 1), (OWN, 1, 1.0, 8, 9, 2),
         (12, 1, 5.0, 8, 3000, 0)], None), own_pid=OWN)
    assert processes.running_threads() == 4
    assert processes.running_threads() is None


def test_on_windows_the_load_leaves_out_programs_below_normal_priority(monkeypatch):
    """SystemLoad as Windows runs it: GetSystemTimes' busy time, this process's own and the lower-priority
    programs' taken out; busy time then means taken cores (no blind probes: CountControl._blind); the threads
    running now from the same list. Where the processes cannot be listed, it is all busy time, which does not
    mean taken cores (programs below normal priority yield them)."""
    system_load = sys.modules[SystemLoad.__module__]        # the joined file, which the suite runs
    monkeypatch.setattr(sys, "platform", "win32")
    busy = iter([100.0, 102.5, 104.0, 105.0])
    monkeypatch.setattr(system_load, "windows_busy_seconds", lambda: next(busy))
    # Over each second: the lower-priority programs used 0.75 s, then nothing, then the list failed; between the
    # first two readings, the threads running now were asked for (3 of the program's 4).
    lists = snapshots([(20, 1, 10.0, 6)], [(20, 1, 10.75, 6)], [(20, 1, 10.75, 6, 4, 3)], [(20, 1, 10.75, 6)],
                      None)
    monkeypatch.setattr(system_load, "ProcessList", lambda: ProcessList(query=lists, own_pid=OWN))
    load = SystemLoad()
    assert load.busy_means_taken is True and load.report() == {"source": "process_list", "busy_means_taken": True}
    # A second between readings, this process's own CPU 1 s, then 0.5 s, then 0.5 s.
    load._last = load._last._replace(at=10.0, own=5.0, own_niced=0.0)
    at_and_own = iter([(11.0, 6.0), (12.0, 6.5), (13.0, 7.0)])

    def reading():
        at, own = next(at_and_own)
        return Reading(at, *load._machine_seconds(), own, 0.0)
    monkeypatch.setattr(load, "_read", reading)        # each reading is due: the clock is far past these
    assert load.others() == pytest.approx(2.5 - 0.75 - 1.0) and load.niced() == pytest.approx(0.75)
    assert load.running_now() == 3
    assert load.others() == pytest.approx(1.5 - 0.5) and load.niced() == pytest.approx(0.0)
    assert load.others() is None and load.niced() is None and load.busy_means_taken is False
    assert load.report() == {"source": "system_times", "busy_means_taken": False}
