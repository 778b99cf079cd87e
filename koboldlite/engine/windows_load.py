"""Windows' process list, for the two readings of the other programs that /proc/stat gives on Linux and
GetSystemTimes does not:
- the CPU time of the programs that run below normal priority. GetSystemTimes counts it as busy, yet those programs
  yield the cores at once to any thread of normal priority (Windows runs the highest priority ready): a virus scan,
  a search indexer, a program in efficiency mode, anything started with `start /belownormal` (Linux counts such
  time apart, /proc/stat's nice column);
- how many of the other programs' threads run or are ready to at this instant (Linux: procs_running).
Both come from NtQuerySystemInformation's process records (SystemProcessInformation), the one call that lists every
process's CPU time and base priority and every thread's state without opening each (Task Manager's way, and
psutil's).

Who calls what: engine/system_load.py's SystemLoad keeps one ProcessList on Windows and asks it at each reading for
the lower-priority programs' CPU seconds so far, and for the threads running now when the thread counts ask. The
records' layout is read here and nowhere else.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Callable, NamedTuple

# SYSTEM_PROCESS_INFORMATION as 64-bit Windows lays it out: NextEntryOffset (ULONG; 0 in the last record) at 0,
# NumberOfThreads 4, WorkingSetPrivateSize 8, HardFaultCount 16, NumberOfThreadsHighWatermark 20, CycleTime 24,
# then CreateTime, UserTime and KernelTime (100 ns units) at 32, 40 and 48, ImageName (a UNICODE_STRING of 16
# bytes) 56, BasePriority (LONG) 72, 4 bytes to the 8-byte boundary, UniqueProcessId (HANDLE) 80, ... 256 bytes
# in all, each followed by its threads' records (SYSTEM_THREAD_INFORMATION, 80 bytes each: KernelTime, UserTime,
# CreateTime, WaitTime and 4 bytes, StartAddress, ClientId (two HANDLEs), Priority, BasePriority, ContextSwitches,
# then ThreadState (a ULONG) at 68, WaitReason 72).
_NEXT = struct.Struct("<I")
_TIMES_AT, _TIMES = 32, struct.Struct("<qqq")
_PRIORITY_AT, _PRIORITY = 72, struct.Struct("<i")
_PID_AT, _PID = 80, struct.Struct("<Q")
RECORD_SIZE, THREAD_SIZE = 256, 80
_STATE_WORD, _THREAD_WORDS = 68 // 4, THREAD_SIZE // 4
RUNNABLE = {1, 2, 3, 7}    # KTHREAD_STATE's Ready, Running, Standby (chosen to run next), DeferredReady
NORMAL_PRIORITY = 8        # NORMAL_PRIORITY_CLASS's base priority; BELOW_NORMAL's is 6, IDLE's (efficiency mode) 4
IDLE_PROCESS = 0           # the System Idle Process: its "CPU time" is the cores' idle time

SYSTEM_PROCESS_INFORMATION = 5
STATUS_INFO_LENGTH_MISMATCH = 0xC0000004


class ProcessTime(NamedTuple):
    """One process's record: its id and creation time (together they name it: ids are reused), CPU seconds so far
    (user and kernel), base priority, and its threads that run or are ready to."""
    pid: int
    created: int
    seconds: float
    priority: int
    runnable: int


def process_records(buffer: bytes | memoryview, threads: bool = True) -> list[ProcessTime] | None:
    """The processes in SystemProcessInformation's records (64-bit layout), their runnable threads counted where
    `threads` (0 otherwise: half the time of a reading); None where the records do not chain within the buffer (a
    layout this does not know: better no reading than a wrong one)."""
    found, offset = [], 0
    while True:
        if offset + RECORD_SIZE > len(buffer):
            return None
        size = RECORD_SIZE + THREAD_SIZE * _NEXT.unpack_from(buffer, offset + 4)[0]     # NumberOfThreads
        if offset + size > len(buffer):
            return None
        created, user, kernel = _TIMES.unpack_from(buffer, _TIMES_AT + offset)
        found.append(ProcessTime(_PID.unpack_from(buffer, _PID_AT + offset)[0], created, (user + kernel) / 1e7,
                                 _PRIORITY.unpack_from(buffer, _PRIORITY_AT + offset)[0],
                                 _runnable(buffer, offset + RECORD_SIZE, offset + size) if threads else 0))
        step = _NEXT.unpack_from(buffer, offset)[0]
        if step == 0:
            return found
        if step < size:
            return None
        offset += step


def _runnable(buffer: bytes | memoryview, start: int, end: int) -> int:
    """The threads whose records lie between start and end that run or are ready to (their states read as one
    array: a desktop has thousands of threads)."""
    if end == start:
        return 0
    states = memoryview(buffer).cast("B")[start:end].cast("I")[_STATE_WORD::_THREAD_WORDS]
    return sum(states.tolist().count(state) for state in RUNNABLE)


class _Query:
    """NtQuerySystemInformation(SystemProcessInformation) into a buffer kept between calls (it grows to fit); the
    records are read from it in place, before the next call."""

    def __init__(self):
        self.buffer = ctypes.create_string_buffer(1 << 18)

    def __call__(self) -> memoryview | None:
        try:
            query = ctypes.windll.ntdll.NtQuerySystemInformation
        except (AttributeError, OSError):
            return None
        for _ in range(8):
            size, needed = len(self.buffer), ctypes.c_ulong(0)
            status = query(SYSTEM_PROCESS_INFORMATION, self.buffer, size, ctypes.byref(needed)) & 0xFFFFFFFF
            if status == 0:
                return memoryview(self.buffer).cast("B")[:needed.value or size]
            if status != STATUS_INFO_LENGTH_MISMATCH:
                return None
            self.buffer = ctypes.create_string_buffer(max(2 * size, needed.value + (1 << 16)))   # more since
        return None


class ProcessList:
    """The readings taken from the process list, each from a list of its own read when asked: the CPU seconds that
    other processes below normal priority used since the first reading (each reading adds what such a process used
    since the one before; a process new since then, all of its time; what one used between the last reading and
    its end is not seen), and the other processes' threads that run now. This process is left out of both
    (SystemLoad counts its own apart), and so is the System Idle Process, whose time and threads are the idle
    cores'."""

    def __init__(self, query: Callable[[], bytes | memoryview | None] | None = None, own_pid: int | None = None):
        self._query = query or (_Query() if struct.calcsize("P") == 8 else (lambda: None))   # 64-bit layout only
        self._own = os.getpid() if own_pid is None else own_pid
        self._last: dict[tuple[int, int], float] | None = None
        self._total = 0.0

    def _others(self, threads: bool) -> list[ProcessTime] | None:
        buffer = self._query()
        records = process_records(buffer, threads) if buffer else None
        return None if records is None else [p for p in records if p.pid not in (IDLE_PROCESS, self._own)]

    def lower_priority_seconds(self) -> float | None:
        """The lower-priority programs' CPU seconds so far; None where the list cannot be read."""
        others = self._others(threads=False)
        if others is None:
            return None
        now = {(p.pid, p.created): p.seconds for p in others}
        if self._last is not None:
            self._total += sum(max(0.0, p.seconds - self._last.get((p.pid, p.created), 0.0))
                               for p in others if p.priority < NORMAL_PRIORITY)
        self._last = now
        return self._total

    def running_threads(self) -> int | None:
        """The other programs' threads that run or are ready to at this instant, at any priority (as Linux's
        procs_running counts them); None where the list cannot be read."""
        others = self._others(threads=True)
        return None if others is None else sum(p.runnable for p in others)
