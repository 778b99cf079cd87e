"""The cores worth a thread of llama.cpp's (engine/cpu_topology.py): one per physical core, the performance ones on
a CPU with both kinds, no more than a cgroup's CPU quota; read from Linux's sysfs and cgroup files and Windows'
processor records as those systems lay them out (written here into folders and a buffer of that layout: an
8-thread SMT desktop, a hybrid Intel CPU, ARM's big and little cores, containers), this machine's own, and the real
server's in a cgroup of one CPU."""

from __future__ import annotations

import os
import struct

import pytest

from koboldlite.engine.cpu_topology import (cgroup_cpu_quota, linux_cores, logical_cpus, math_cores, parse_cpu_list,
                                            windows_cores)


def sysfs(tmp_path, siblings: dict[int, str], performance: str | None = None, efficiency: str | None = None,
          name: str = "core_cpus_list", capacity: dict[int, int] | None = None):
    """A sysfs of these CPUs: each one's sibling list (and cpu_capacity where given), and the hybrid Intel CPU's two
    lists where given."""
    root = tmp_path / "cpu"
    for cpu, text in siblings.items():
        (root / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (root / f"cpu{cpu}" / "topology" / name).write_text(text + "\n")
        if capacity:
            (root / f"cpu{cpu}" / "cpu_capacity").write_text(f"{capacity[cpu]}\n")
    kinds = {}
    for kind, text in (("cpu_core", performance), ("cpu_atom", efficiency)):
        kinds[kind] = str(tmp_path / kind / "cpus")
        if text is not None:
            (tmp_path / kind).mkdir()
            (tmp_path / kind / "cpus").write_text(text + "\n")
    return dict(root=str(root), performance=kinds["cpu_core"], efficiency=kinds["cpu_atom"])


def test_cpu_lists_parse():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5} and parse_cpu_list("") == set() and parse_cpu_list("a-b") == set()


def test_an_smt_desktop_counts_one_thread_a_core(tmp_path):
    """Four cores of two hardware threads (Linux numbers the second ones after the first: 0 and 4 share a core)."""
    paths = sysfs(tmp_path, {cpu: f"{cpu % 4},{cpu % 4 + 4}" for cpu in range(8)})
    assert linux_cores(list(range(8)), **paths) == 4
    assert linux_cores([0, 4], **paths) == 1            # an affinity of one core's two threads: one core
    assert linux_cores([0, 1], **paths) == 2
    # Kernels before 5.3 name the file thread_siblings_list.
    old = sysfs(tmp_path / "old", {cpu: f"{cpu % 4},{cpu % 4 + 4}" for cpu in range(8)}, name="thread_siblings_list")
    assert linux_cores(list(range(8)), **old) == 4


def test_a_hybrid_cpu_counts_its_performance_cores(tmp_path):
    """Two performance cores with two threads each (0-3) and four efficiency cores of one (4-7)."""
    siblings = {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3", 4: "4", 5: "5", 6: "6", 7: "7"}
    paths = sysfs(tmp_path, siblings, performance="0-3", efficiency="4-7")
    assert linux_cores(list(range(8)), **paths) == 2
    assert linux_cores([4, 5], **paths) == 2            # held to efficiency cores: those are the cores there are
    # Without the efficiency list (a CPU of one kind with perf's cpu_core folder), every core counts.
    one_kind = sysfs(tmp_path / "one", siblings, performance="0-7")
    assert linux_cores(list(range(8)), **one_kind) == 6


def test_arm_big_and_little_cores_count_the_big_ones(tmp_path):
    """cpu_capacity: four little cores (446) and four big (1024), as an RK3588 reads; a prime core, three big and
    four little; cores of one kind, and cores a boost bin apart, all count."""
    one_each = {cpu: str(cpu) for cpu in range(8)}
    assert linux_cores(list(range(8)), **sysfs(tmp_path / "a", one_each,
                                               capacity={c: 446 if c < 4 else 1024 for c in range(8)})) == 4
    tiers = {0: 1024, 1: 960, 2: 960, 3: 960, 4: 350, 5: 350, 6: 350, 7: 350}
    assert linux_cores(list(range(8)), **sysfs(tmp_path / "b", one_each, capacity=tiers)) == 4
    assert linux_cores([4, 5], **sysfs(tmp_path / "c", one_each, capacity=tiers)) == 2    # held to the little ones
    assert linux_cores(list(range(8)), **sysfs(tmp_path / "d", one_each, capacity={c: 1024 for c in range(8)})) == 8
    assert linux_cores(list(range(8)), **sysfs(tmp_path / "e", one_each,
                                               capacity={c: 1024 if c < 2 else 1000 for c in range(8)})) == 8


def test_without_a_topology_the_count_is_unknown(tmp_path):
    assert linux_cores([0, 1], **sysfs(tmp_path, {0: "0"})) is None


def core_record(efficiency_class: int, mask: int, relationship: int = 0) -> bytes:
    """One SYSTEM_LOGICAL_PROCESSOR_INFORMATION_EX record of a core: its two DWORDs, PROCESSOR_RELATIONSHIP's
    Flags (1: SMT), EfficiencyClass, 20 reserved bytes, GroupCount, 2 bytes to the 8-byte boundary, one
    GROUP_AFFINITY (mask, group, 6 reserved bytes)."""
    body = struct.pack("<BB20xH2xQH6x", int(bin(mask).count("1") > 1), efficiency_class, 1, mask, 0)
    return struct.pack("<II", relationship, 8 + len(body)) + body


def test_windows_processor_records_count_the_performance_cores():
    hybrid = b"".join([core_record(1, 0b11 << (2 * i)) for i in range(4)] +
                      [core_record(0, 1 << (8 + i)) for i in range(4)])
    assert windows_cores(hybrid) == 4
    one_kind = b"".join(core_record(0, 0b11 << (2 * i)) for i in range(6))
    assert windows_cores(one_kind) == 6
    # A record of another relationship is passed over; a cut record ends the reading; nothing: unknown.
    assert windows_cores(core_record(0, 1, relationship=2) + one_kind + core_record(0, 1)[:20]) == 6
    assert windows_cores(b"") is None and windows_cores(None) is None and windows_cores(b"\0" * 7) is None


def test_this_machine():
    """Every hardware thread of the affinity is logical; the cores are its distinct sibling sets, read here the
    way llama.cpp's common library reads them."""
    cpus = os.sched_getaffinity(0)
    assert logical_cpus() == len(cpus)
    sets = set()
    for cpu in cpus:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings") as f:
            sets.add(f.read())
    assert math_cores() == len(sets) <= logical_cpus()


def cgroups(tmp_path, mountinfo: list[str], own: list[str], limits: dict[str, dict[str, str]]):
    """A /proc/self of these mounts and cgroups, and cgroup folders (under tmp_path) with these files."""
    proc = tmp_path / "proc"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text("".join(line.replace("ROOT", str(tmp_path)) + "\n" for line in mountinfo))
    (proc / "cgroup").write_text("".join(line + "\n" for line in own))
    for folder, files in limits.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp_path / folder / name).write_text(text + "\n")
    return str(proc)


def test_cgroup_v2_quota(tmp_path):
    """A container's --cpus or systemd's CPUQuota (cgroup v2's cpu.max): the least along the way up."""
    v2 = ["30 25 0:26 / ROOT/cg rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"]
    proc = cgroups(tmp_path, v2, ["0::/user.slice/app"],
                   {"cg/user.slice/app": {"cpu.max": "max 100000"}, "cg/user.slice": {"cpu.max": "150000 100000"},
                    "cg": {}})
    assert cgroup_cpu_quota(proc) == 1.5
    proc = cgroups(tmp_path / "b", v2, ["0::/"], {"cg": {"cpu.max": "max 100000"}})
    assert cgroup_cpu_quota(proc) is None


def test_cgroup_v1_quota(tmp_path):
    """v1's quota over its period, in a hierarchy mounted with cpu beside cpuacct, and in a container whose mount's
    root is its own cgroup; -1 is none."""
    v1 = ["32 31 0:29 / ROOT/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct",
          "33 31 0:30 / ROOT/memory rw,relatime - cgroup cgroup rw,memory"]
    proc = cgroups(tmp_path, v1, ["5:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc"],
                   {"cpu,cpuacct/docker/abc": {"cpu.cfs_quota_us": "50000", "cpu.cfs_period_us": "100000"},
                    "cpu,cpuacct": {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"}})
    assert cgroup_cpu_quota(proc) == 0.5
    # Inside the container: the hierarchy is mounted from the container's own cgroup.
    inside = ["40 31 0:29 /docker/abc ROOT/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct"]
    proc = cgroups(tmp_path / "in", inside, ["4:cpu,cpuacct:/docker/abc"],
                   {"cpu": {"cpu.cfs_quota_us": "300000", "cpu.cfs_period_us": "100000"}})
    assert cgroup_cpu_quota(proc) == 3.0
    unlimited = cgroups(tmp_path / "none", v1, ["4:cpu,cpuacct:/"],
                        {"cpu,cpuacct": {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"}})
    assert cgroup_cpu_quota(unlimited) is None


CPU_HIERARCHY = "/sys/fs/cgroup/cpu"


def test_a_server_in_a_cgroup_of_one_cpu_runs_one_thread(tmp_path):
    """The real server started inside a cgroup v1 of one CPU's quota on this 2-core machine: one thread at most."""
    if not os.access(CPU_HIERARCHY, os.W_OK) or not os.path.exists(f"{CPU_HIERARCHY}/cpu.cfs_quota_us"):
        pytest.skip("no writable cgroup v1 cpu hierarchy here")
    from tests.harness import PIP_LLAMA_LIB, ServerProcess, program_command
    from koboldlite.model_files import find_starter_model
    group = f"{CPU_HIERARCHY}/koboldlite-test-{os.getpid()}"
    os.mkdir(group)
    try:
        with open(f"{group}/cpu.cfs_quota_us", "w") as f:
            with open(f"{group}/cpu.cfs_period_us") as period:
                f.write(period.read().strip())          # a quota of one period each period: one CPU
        enter = f'echo $$ > {group}/cgroup.procs && exec "$@"'
        s = ServerProcess(["--model", find_starter_model()], env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB},
                          command=["sh", "-c", enter, "sh", *program_command(), "--port", "0"])
        try:
            threads = s.json("GET", "/props")["threads"]
            assert threads["generation"]["most"] == 1 and threads["logical_cpus"] == len(os.sched_getaffinity(0))
        finally:
            s.stop()
    finally:
        os.rmdir(group)
