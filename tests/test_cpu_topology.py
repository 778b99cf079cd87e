"""The cores worth a thread of llama.cpp's (engine/cpu_topology.py): one per physical core, the performance ones on
a CPU with both kinds, read from Linux's sysfs and Windows' processor records as those systems lay them out (here
written into a folder and a buffer of that layout, as an 8-thread SMT desktop and a hybrid Intel CPU show them),
and this machine's own."""

from __future__ import annotations

import os
import struct

from koboldlite.engine.cpu_topology import linux_cores, logical_cpus, math_cores, parse_cpu_list, windows_cores


def sysfs(tmp_path, siblings: dict[int, str], performance: str | None = None, efficiency: str | None = None,
          name: str = "core_cpus_list"):
    """A sysfs of these CPUs: each one's sibling list, and the hybrid CPU's two lists where given."""
    root = tmp_path / "cpu"
    for cpu, text in siblings.items():
        (root / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (root / f"cpu{cpu}" / "topology" / name).write_text(text + "\n")
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
