"""llama.cpp's AMX kernels are left unused where the compiler that built them broke them.

GCC 12's _tile_loadconfig lets the optimizer drop the tile shapes ggml writes before it: on a CPU with AMX the
first tile instruction then faults and the whole server dies (found on a Xeon with AMX running pip's build, which
Debian 12's GCC 12.2 compiled). The guard reads the compiler from the CPU library's ELF .comment section and loads
weights without llama.cpp's extra buffer types (AMX, repacked layouts) then. Unit tests on ELF files written
here; on the real server, the pip build's verdict is reported and generation works (on this project's AMX
machine it crashed before the guard)."""

from __future__ import annotations

import os
import struct

import pytest

from koboldlite.engine.llama_build import amx_fault, elf_comment
from tests.harness import PIP_LLAMA_LIB, ServerProcess

AMX_FEATURES = ["AVX2", "AVX512", "AVX512_VNNI", "AMX_INT8"]


def write_elf(path, comment: bytes | None):
    """A minimal 64-bit little-endian ELF: a null section, .shstrtab, and .comment holding `comment`."""
    names = b"\0.shstrtab\0.comment\0"
    body = names + (comment or b"")
    header_size, section_size = 64, 64
    shoff = header_size + len(body)
    sections = [b"\0" * section_size,
                struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, header_size, len(names), 0, 0, 1, 0)]
    if comment is not None:
        sections.append(struct.pack("<IIQQQQIIQQ", 11, 1, 0x30, 0, header_size + len(names), len(comment),
                                    0, 0, 1, 1))
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, header_size, 0, 0,
                                 section_size, len(sections), 1)
    with open(path, "wb") as f:
        f.write(header + body + b"".join(sections))


def test_the_comment_section_names_the_compilers(tmp_path):
    lib = tmp_path / "libggml-cpu.so"
    write_elf(lib, b"GCC: (Debian 12.2.0-14+deb12u1) 12.2.0\0GCC: (Debian 12.2.0-14+deb12u1) 12.2.0\0")
    assert elf_comment(str(lib)) == ["GCC: (Debian 12.2.0-14+deb12u1) 12.2.0"] * 2
    write_elf(lib, None)
    assert elf_comment(str(lib)) == []
    (tmp_path / "text").write_text("not an ELF file")
    assert elf_comment(str(tmp_path / "text")) == []
    assert elf_comment(str(tmp_path / "missing")) == []
    (tmp_path / "short").write_bytes(b"\x7fELF\x02\x01")         # cut short: no verdict, no exception
    assert elf_comment(str(tmp_path / "short")) == []


@pytest.mark.parametrize("comment, faulty", [
    (b"GCC: (Debian 12.2.0-14+deb12u1) 12.2.0\0", True),
    (b"GCC: (GNU) 11.4.0\0", True),
    (b"GCC: (Ubuntu 13.2.0-23ubuntu4) 13.2.0\0", False),
    (b"GCC: (GNU) 14.2.1 20240912 (Red Hat 14.2.1-3)\0", False),
    (b"Ubuntu clang version 18.1.3 (1ubuntu1)\0", False),
])
def test_amx_kernels_are_judged_by_their_compiler(tmp_path, comment, faulty):
    lib = tmp_path / "libggml-cpu-sapphirerapids.so"
    write_elf(lib, comment)
    verdict = amx_fault(AMX_FEATURES, str(lib))
    assert (verdict is not None) == faulty, verdict
    if faulty:
        assert "GCC" in verdict and "crash" in verdict
    # Without AMX in the CPU code there is nothing to guard, whoever built it.
    assert amx_fault(["AVX2", "AVX512"], str(lib)) is None


def test_the_server_reports_its_verdict_and_generates(starter_model):
    """pip's build on this machine: where its CPU code has AMX kernels from a faulty GCC (this project's CI
    machine), they are off, said at start-up and in /props, and the server generates; elsewhere they stay on."""
    s = ServerProcess(["--model", starter_model, "--contextsize", "512"], env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB})
    try:
        cpu = s.json("GET", "/props")["cpu_backend"]
        fault = amx_fault(cpu["features"], os.path.join(PIP_LLAMA_LIB, cpu["library"]))
        assert cpu["extra_buffers"] == ("off: " + fault if fault else "on")
        if fault:
            s.wait_for_line("^CPU: llama.cpp's AMX and repacked weight layouts are off: .*GCC")
        status, _, body = s.request("POST", "/v1/completions", {"prompt": "The capital of France is",
                                                                "max_tokens": 8, "temperature": 0})
        assert status == 200, body
        assert s.proc.poll() is None
    finally:
        s.stop()
