"""How many CPUs this process may run on, and how many of them are cores worth a thread of llama.cpp's.

Two numbers, because a desktop CPU's cores mostly run two hardware threads each (SMT, Hyper-Threading):
- logical_cpus(): every hardware thread the process may run on. What other programs' load is weighed against
  (a busy program on one hardware thread leaves its sibling free) and what GNU OpenMP counts as its cores.
- math_cores(): one per physical core, and on a CPU with performance and efficiency cores (Intel's since the 12th
  generation, Apple's) the performance ones only. What llama.cpp's threads are counted in: two threads on one
  core share its vector units, and every barrier waits for the slower of them, so llama-server's default is this
  count (common.cpp's cpu_get_num_math: the distinct thread-sibling sets, Intel's efficiency cores left out),
  KoboldCpp's about half the hardware threads, less one. On Linux, no more than a cgroup's CPU quota either (a
  container's --cpus), which neither of them reads.

Who calls what: cpu_threads.most_threads() and ServedModel ask both once, at start.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import struct
import sys

LINUX_CPUS = "/sys/devices/system/cpu"
# On a hybrid Intel CPU, Linux's perf drivers list the performance and the efficiency cores' hardware threads here.
LINUX_PERFORMANCE_CPUS = "/sys/devices/cpu_core/cpus"
LINUX_EFFICIENCY_CPUS = "/sys/devices/cpu_atom/cpus"
# A core whose cpu_capacity is at least this share of the largest is a big one (ARM's prime and big cores, where a
# little one reads about a third to a half; cores that differ by a boost bin read within a few percent).
BIG_CORE_SHARE = 0.75


def logical_cpus() -> int:
    """The hardware threads this process may run on (its affinity, where the system says), at least one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@functools.cache
def math_cores() -> int:
    """The cores worth a thread each among those this process may run on: physical cores, the performance ones
    where a CPU has both kinds (logical_cpus() where the system does not say), and no more than its cgroup's CPU
    quota, rounded up. Read once a process: a model's contexts, its draft model, projector and embedder all ask,
    and on a large machine each reading is a few hundred sysfs files."""
    if sys.platform.startswith("linux"):
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except OSError:
            cpus = []
        cores = linux_cores(cpus) if cpus else None
    elif sys.platform == "win32":
        cores = windows_cores(_windows_core_records())
    elif sys.platform == "darwin":
        cores = _mac_performance_cores()
    else:
        cores = None
    cores = min(cores, logical_cpus()) if cores else logical_cpus()
    quota = cgroup_cpu_quota() if sys.platform.startswith("linux") else None
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(proc: str = "/proc/self") -> float | None:
    """The CPUs' worth of time this process's cgroup and those above it may use (a container's `--cpus`, systemd's
    CPUQuota): cgroup v2's cpu.max, v1's cpu.cfs_quota_us over cpu.cfs_period_us, the least along the way up;
    None where no limit is set or the system does not say. Threads past it do not run at once: the cgroup's
    time runs out early in each period and all of them stop until the next, after spinning its time away at
    barriers."""
    mounts = _cgroup_mounts(proc)
    limits = []
    for controllers, path in _own_cgroups(proc):
        for version, mount_root, mount_point in mounts:
            if (version == 2) != (controllers == ""):
                continue
            if version == 1 and "cpu" not in controllers.split(","):
                continue
            if not (path == mount_root or path.startswith(mount_root.rstrip("/") + "/")):
                continue
            folder = os.path.join(mount_point, path[len(mount_root):].lstrip("/"))
            limits += _limits_up(folder, mount_point, version)
    return min(limits) if limits else None


def _limits_up(folder: str, mount_point: str, version: int) -> list[float]:
    """The CPU limits set from a cgroup's folder up to its hierarchy's mount point."""
    limits = []
    while True:
        limit = _cgroup_limit(folder, version)
        if limit:
            limits.append(limit)
        parent = os.path.dirname(folder.rstrip("/"))
        if os.path.normpath(folder) == os.path.normpath(mount_point) or parent == folder:
            return limits
        folder = parent


def _cgroup_mounts(proc: str) -> list[tuple[int, str, str]]:
    """The cgroup hierarchies mounted here: (version, the hierarchy's folder at the mount, where it is mounted),
    for v1 only those with the cpu controller (mountinfo: root is field 4, the mount point 5, then after " - " the
    file system type and the super options)."""
    found = []
    for line in (_read(f"{proc}/mountinfo") or "").splitlines():
        head, _, tail = line.partition(" - ")
        fields, tail_fields = head.split(), tail.split()
        if len(fields) < 5 or len(tail_fields) < 3:
            continue
        kind, options = tail_fields[0], tail_fields[2].split(",")
        if kind == "cgroup2":
            found.append((2, fields[3], fields[4]))
        elif kind == "cgroup" and "cpu" in options:
            found.append((1, fields[3], fields[4]))
    return found


def _own_cgroups(proc: str) -> list[tuple[str, str]]:
    """This process's cgroups, (controllers, path): "" for v2's one line ("0::/path")."""
    out = []
    for line in (_read(f"{proc}/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def _cgroup_limit(folder: str, version: int) -> float | None:
    """One cgroup folder's CPU limit in CPUs, None where it sets none."""
    try:
        if version == 2:
            words = (_read(os.path.join(folder, "cpu.max")) or "").split()     # "max 100000", "200000 100000"
            if not words or words[0] == "max":
                return None
            return int(words[0]) / int(words[1] if len(words) > 1 else 100000)
        quota, period = (_read(os.path.join(folder, name)) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        if not quota or not period or int(quota) <= 0:
            return None
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def parse_cpu_list(text: str) -> set[int]:
    """Linux's CPU list format ("0-3,8,10-11") as a set; empty where it does not parse."""
    cpus: set[int] = set()
    try:
        for part in text.strip().split(","):
            if part:
                low, _, high = part.partition("-")
                cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        return set()
    return cpus


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def linux_cores(cpus: list[int], root: str = LINUX_CPUS, performance: str = LINUX_PERFORMANCE_CPUS,
                efficiency: str = LINUX_EFFICIENCY_CPUS) -> int | None:
    """The physical cores the hardware threads `cpus` belong to (their sibling sets in sysfs), the performance
    cores only where the CPU has two kinds and some of `cpus` are performance ones: a hybrid Intel CPU's that
    `performance` lists beside `efficiency`'s, else those whose cpu_capacity (ARM's big.LITTLE: a little core
    reads about a third to a half of a big one's) is near the largest; None where sysfs does not say (a CPU
    without a topology folder)."""
    cores: set[frozenset[int]] = set()
    capacity: dict[frozenset[int], int] = {}
    for cpu in cpus:
        siblings = _read(f"{root}/cpu{cpu}/topology/core_cpus_list") or \
            _read(f"{root}/cpu{cpu}/topology/thread_siblings_list")
        group = parse_cpu_list(siblings) if siblings else set()
        if not group:
            return None
        core = frozenset(group)
        cores.add(core)
        try:
            capacity[core] = max(capacity.get(core, 0), int(_read(f"{root}/cpu{cpu}/cpu_capacity") or ""))
        except ValueError:
            pass
    fast = parse_cpu_list(_read(performance) or "")
    if fast and _read(efficiency) is not None:
        fast_cores = {core for core in cores if core & fast}
    elif len(capacity) == len(cores) and capacity:
        fast_cores = {core for core in cores if capacity[core] >= BIG_CORE_SHARE * max(capacity.values())}
    else:
        fast_cores = cores
    return len(fast_cores or cores) or None


# Windows' GetLogicalProcessorInformationEx(RelationProcessorCore): one record a physical core, each a
# SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX: Relationship and Size (two DWORDs), then PROCESSOR_RELATIONSHIP: Flags,
# EfficiencyClass (higher: a faster core; all 0 on a CPU of one kind), 20 reserved bytes, GroupCount, and from
# offset 24 (8-byte aligned) GroupCount GROUP_AFFINITY of 16 bytes (a mask of its hardware threads, and a group).
RELATION_PROCESSOR_CORE = 0
_RECORD_HEAD = struct.Struct("<II")
_CORE_CLASS_AT = 8 + 1


def windows_cores(buffer: bytes | None) -> int | None:
    """The physical cores in GetLogicalProcessorInformationEx's records, those of the highest efficiency class
    (the performance cores) only; None where there are none."""
    if not buffer:
        return None
    classes: list[int] = []
    offset = 0
    while offset + _RECORD_HEAD.size <= len(buffer):
        relationship, size = _RECORD_HEAD.unpack_from(buffer, offset)
        if size < _RECORD_HEAD.size or offset + size > len(buffer):
            break
        if relationship == RELATION_PROCESSOR_CORE and size > _CORE_CLASS_AT:
            classes.append(buffer[offset + _CORE_CLASS_AT])
        offset += size
    return classes.count(max(classes)) if classes else None


def _windows_core_records() -> bytes | None:
    try:
        kernel32 = ctypes.windll.kernel32
        size = ctypes.c_uint32(0)
        kernel32.GetLogicalProcessorInformationEx(RELATION_PROCESSOR_CORE, None, ctypes.byref(size))
        if not size.value:
            return None
        buffer = ctypes.create_string_buffer(size.value)
        if not kernel32.GetLogicalProcessorInformationEx(RELATION_PROCESSOR_CORE, buffer, ctypes.byref(size)):
            return None
        return buffer.raw[:size.value]
    except (AttributeError, OSError):
        return None


def _mac_performance_cores() -> int | None:
    """macOS: the performance cores (perflevel0: Apple silicon's), else the physical ones."""
    try:
        libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
    except OSError:
        return None
    for name in (b"hw.perflevel0.physicalcpu", b"hw.physicalcpu"):
        value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
        if libc.sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0 \
                and value.value > 0:
            return value.value
    return None
