"""What the other programs take of the CPU: their CPU time over a reading, at normal priority and niced apart, and
how many of their threads run at this instant (Linux's /proc/stat; Windows' GetSystemTimes and its process list,
engine/windows_load.py).

Who calls what: engine/cpu_threads.py's thread counts read it around decodes; engine/drafting.py reads the others'
use over its measurement of what decodes cost, to know whether busy programs skewed it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import NamedTuple

from .cpu_topology import logical_cpus
from .windows_load import ProcessList


def windows_busy_seconds() -> float | None:
    """Windows' busy CPU seconds since boot, all cores and priorities (GetSystemTimes)."""
    idle, kernel, user = (ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64())
    if not ctypes.windll.kernel32.GetSystemTimes(ctypes.byref(idle), ctypes.byref(kernel), ctypes.byref(user)):
        return None
    return (kernel.value + user.value - idle.value) / 1e7       # kernel time includes idle time


class Reading(NamedTuple):
    """CPU seconds since boot at one moment: the machine's at normal priority or above and at a lower one (None
    where the system does not say), and this process's share of each."""
    at: float
    busy: float | None
    niced: float | None
    own: float
    own_niced: float


class SystemLoad:
    """The CPU the rest of the machine used since the last reading, in cores: busy time at normal priority or above,
    less this process's own. Time of programs at a lower priority (nice above 0) is left out: they yield the
    cores to the server, and the threads are better kept (Linux counts it apart in /proc/stat; on Windows it is
    the time of the processes below normal priority; niced() says how much of it there was). Elsewhere nothing
    is known (None). busy_means_taken says whether busy time read means cores this process would wait for: not
    where the readings count cores it may not run on (a container given a few of the host's, whose /proc/stat is
    the host's; taskset), nor where lower-priority time cannot be told apart (it counts as busy, yet yields)."""

    WINDOW = 0.25         # seconds: shorter readings are too coarse (Linux counts CPU time in 10 ms ticks)

    def __init__(self):
        self._processes = ProcessList() if sys.platform == "win32" else None
        self._last = self._read()
        self._others: float | None = None
        self._niced: float | None = None
        self._niced_seconds: float | None = None
        self._own_cores_counted = self._machine_cores() <= logical_cpus()

    @property
    def busy_means_taken(self) -> bool:
        """Busy time read means cores this process would wait for (see the class)."""
        return self._own_cores_counted and self._last.niced is not None

    @staticmethod
    def _machine_cores() -> int:
        """The cores the machine readings count (Linux: /proc/stat's cpuN lines; Windows: every one, as the
        process may run on every one where os.sched_getaffinity is missing)."""
        if sys.platform.startswith("linux"):
            try:
                with open("/proc/stat") as f:
                    return sum(line.startswith("cpu") and line[3:4].isdigit() for line in f)
            except OSError:
                pass
        return logical_cpus()

    def _machine_seconds(self) -> tuple[float | None, float | None]:
        """CPU seconds of the whole machine since boot, all cores: busy at normal priority or above (yielding to
        nobody), and niced (on Windows: since the first reading)."""
        if sys.platform.startswith("linux"):
            try:
                with open("/proc/stat") as f:
                    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
            except (OSError, ValueError):
                return None, None
            tick = os.sysconf("SC_CLK_TCK")
            return (user + system + irq + softirq + steal) / tick, nice / tick
        if sys.platform == "win32":
            busy = windows_busy_seconds()
            lower = self._processes.lower_priority_seconds() if busy is not None else None
            return (busy, None) if lower is None else (busy - lower, lower)
        return None, None

    @staticmethod
    def _own_seconds() -> tuple[float, float]:
        """This process's CPU seconds as _machine_seconds counts them: its user time goes to the niced column when
        it runs niced itself (--lowpriority), its system time never does."""
        t = os.times()
        try:
            niced = sys.platform.startswith("linux") and os.getpriority(os.PRIO_PROCESS, 0) > 0
        except OSError:
            niced = False
        return t.system + (0.0 if niced else t.user), (t.user if niced else 0.0)

    def _read(self) -> Reading:
        return Reading(time.monotonic(), *self._machine_seconds(), *self._own_seconds())

    def reading(self) -> Reading:
        """A reading of its own, for others_between() (the one others() keeps is not moved)."""
        return self._read()

    @classmethod
    def others_between(cls, a: Reading, b: Reading) -> float | None:
        """Cores' worth of CPU the other programs used at normal priority or above between two readings; None where
        the system does not say, or they are less than WINDOW apart (a few ticks would read as cores). Where one of
        the two tells lower-priority time apart and the other does not (a Windows reading that failed), their busy
        times count different things."""
        if a.busy is None or b.busy is None or b.at - a.at < cls.WINDOW or (a.niced is None) != (b.niced is None):
            return None
        return max(0.0, (b.busy - a.busy) - (b.own - a.own)) / (b.at - a.at)

    def running_now(self) -> int | None:
        """Other programs' threads running or ready to run at this instant, niced or not (Linux: /proc/stat's
        procs_running, less this process's running threads; Windows: the states of the other processes' threads);
        None elsewhere."""
        if sys.platform == "win32":
            return self._processes.running_threads()
        if not sys.platform.startswith("linux"):
            return None
        try:
            with open("/proc/stat") as f:
                running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        except (OSError, StopIteration, ValueError):
            return None
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                pass                        # a thread that ended meanwhile
        return max(0, running - own)

    def report(self) -> dict:
        """Where the readings come from, for /props' threads.readings: "proc_stat" (Linux), "process_list"
        (Windows, lower-priority time told apart), "system_times" (Windows where the process list cannot be read)
        or None (nothing known); and whether busy time read means taken cores."""
        if self._last.busy is None:
            source = None
        elif sys.platform == "win32":
            source = "process_list" if self._last.niced is not None else "system_times"
        else:
            source = "proc_stat"
        return {"source": source, "busy_means_taken": self.busy_means_taken}

    def others(self) -> float | None:
        """Cores' worth of CPU the other programs used over the last reading (at least WINDOW seconds long, taken
        when asked); None where the system does not say."""
        if time.monotonic() - self._last.at >= self.WINDOW:
            a, b = self._last, self._read()
            self._last = b
            self._others = self.others_between(a, b)
            self._niced_seconds = None if a.niced is None or b.niced is None else \
                max(0.0, (b.niced - a.niced) - (b.own_niced - a.own_niced))
            self._niced = None if self._niced_seconds is None else self._niced_seconds / (b.at - a.at)
        return self._others

    def niced(self) -> float | None:
        """Cores' worth of CPU the other programs used at a lower priority over the same reading as others()'s
        last (taken by others()); None where the system does not say."""
        return self._niced

    def niced_seconds(self) -> float | None:
        """The CPU seconds behind niced(): a pause's reading is long, and over it a niced program that started a
        second before its end is a small share of a core."""
        return self._niced_seconds
