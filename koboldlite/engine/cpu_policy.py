"""How this process shares the CPU with the user's other programs, set once at start: the way llama.cpp's worker
threads wait for each other, and the process's priority.

Who calls what: main.configuration() calls apply_wait_policy() and set_priority() right after the options are read,
before choose_build() (engine/llama_build.py) loads ggml. The thread count each decode uses is engine/cpu_threads.py's.

Why the waiting matters: llama.cpp's threads meet at a barrier after every operation of every step. The builds this
program loads (pip's, tools/build_llama_lib.sh's) run those threads under OpenMP, whose runtime spins at a barrier
before it sleeps (GNU libgomp: 300,000 rounds). llama.cpp's threadpool `poll` setting does nothing in an OpenMP
build (ggml ignores it there), and libgomp has no call that sets its policy: it reads OMP_WAIT_POLICY and
GOMP_SPINCOUNT once, when it is loaded. So a policy is set as those variables, in this process's environment, before
the library is loaded; a value the user set is never replaced. A build without OpenMP (macOS's) runs ggml's own
threads, which read none of them: the CPU backend says which (engine/llama_build.py, CPUBackend.openmp), and there
the policy is the poll level of KoboldLite's own threadpools (engine/threadpool.py, poll_level).

The default is the runtime's own spin, measured (bench/results/wait-policy.md, two threads always): beside one busy
program a short spin made it worse (12 tokens/s against 29), beside a program at nice 10 far worse (32 against
105, where spinning threads keep the cores that program yields), and quiet the same. Contention itself is met by
the thread count (engine/cpu_threads.py): with one thread there is no barrier to wait at.
"""

from __future__ import annotations

import ctypes
import enum
import os
import sys


class WaitPolicy(enum.Enum):
    """How a llama.cpp worker thread waits at a barrier for the others (--cpuwait)."""

    SPIN = "spin"          # the OpenMP runtime's default: spin long (libgomp: 300,000 rounds), then sleep
    SHORT = "short"        # spin ~0.1 ms, then sleep: less CPU burnt at a stalled barrier, slower beside others
    PASSIVE = "passive"    # sleep at once: the least CPU, but a third slower on a quiet machine


# The variables each policy puts in the environment: libgomp (GCC builds) reads GOMP_SPINCOUNT and
# OMP_WAIT_POLICY; LLVM's libomp reads KMP_BLOCKTIME (ms; ggml sets 200 where it is unset); MSVC's vcomp reads
# OMP_WAIT_POLICY only, so SHORT is its default there.
WAIT_ENVIRONMENT = {
    WaitPolicy.SHORT: {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"},
    WaitPolicy.SPIN: {},
    WaitPolicy.PASSIVE: {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"},
}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def openmp_runtime_loaded() -> bool:
    """An OpenMP runtime is already in this process (loaded by something imported earlier): the policy set now
    would not reach it. Linux only (its memory map); elsewhere the answer is no."""
    try:
        with open("/proc/self/maps") as maps:
            return any(name in line for line in maps for name in ("libgomp", "libomp", "libiomp"))
    except OSError:
        return False


def apply_wait_policy(policy: WaitPolicy, environ=os.environ) -> dict:
    """Put the policy's variables in the environment, leaving any the user set; what is in force, for /props.
    Called before ggml (and so its OpenMP runtime) is loaded."""
    user = {k: environ[k] for k in WAIT_VARIABLES if k in environ}
    applied = {}
    if not user:                       # a user who set any of them chose their own policy: all of theirs stands
        for key, value in WAIT_ENVIRONMENT[policy].items():
            environ[key] = value
            applied[key] = value
    return {"policy": policy.value if not user else "environment", "environment": {**user, **applied},
            "in_force": not openmp_runtime_loaded()}


class Priority(enum.Enum):
    """The process's CPU priority (--highpriority, --lowpriority)."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


# Linux nice values, and Windows priority classes (BELOW_NORMAL, HIGH: REALTIME could starve the desktop).
NICE = {Priority.LOW: 10, Priority.HIGH: -10}
WINDOWS_CLASS = {Priority.LOW: 0x4000, Priority.HIGH: 0x80}


def set_priority(priority: Priority) -> tuple[Priority, str]:
    """Set the whole process's priority: the priority in force, and a line saying what was done (or why not) for
    the start-up log. Called at start, before the model's threads exist: on Linux a nice value is each thread's
    own, and threads made later inherit their maker's, so every thread that exists now is set, and those to come
    follow."""
    if priority is Priority.NORMAL:
        return priority, ""
    if sys.platform == "win32":
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetCurrentProcess.restype = ctypes.c_void_p
        kernel32.SetPriorityClass.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        if not kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), WINDOWS_CLASS[priority]):
            return Priority.NORMAL, f"priority: not changed (SetPriorityClass failed, error {ctypes.get_last_error()})"
        name = "HIGH" if priority is Priority.HIGH else "BELOW_NORMAL"
        return priority, f"priority: {priority.value} (Windows priority class {name})"
    nice = NICE[priority]
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]                     # no /proc (macOS): the calling thread, whose later threads inherit it
    try:
        for task in tasks:
            os.setpriority(os.PRIO_PROCESS, task, nice)
    except PermissionError:
        return Priority.NORMAL, (f"priority: not raised (nice {nice} needs root, CAP_SYS_NICE or a nice limit in "
                                 f"/etc/security/limits.conf): running at normal priority")
    except OSError as e:
        return Priority.NORMAL, f"priority: not changed ({e})"
    return priority, f"priority: {priority.value} (nice {nice})"
