"""Every x86-64 CPU (issue 34): llama.cpp built with all its CPU variants (tools/build_llama_lib.sh; tests/install.sh
builds the Vulkan kind into .llama-vulkan/lib), the best variant for the CPU loaded at start.

Older CPUs are emulated by Debian's qemu-user (qemu-x86_64 -cpu Nehalem|SandyBridge|Haswell), which runs this
machine's Python and the server on the emulated CPU: it has SSE4.2, AVX and AVX2, never AVX-512. Emulation is
slow: one thread, a small context and replies of a few tokens. (A one-file executable re-executes itself, which
escapes qemu-user: the emulated CPUs run the server with the same libraries the executable carries.)"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.harness import PIP_LLAMA_LIB, ROOT, ServerProcess, WatchedProcess, program_command

VARIANTS_LIB = os.path.join(ROOT, ".llama-vulkan", "lib")
QEMU = shutil.which("qemu-x86_64")
NO_VULKAN_DRIVER = {"VK_ICD_FILENAMES": "/nonexistent.json", "VK_DRIVER_FILES": "/nonexistent.json"}

# ggml's x86 variants (ggml/src/CMakeLists.txt of the vendored llama.cpp) and what each needs, as /proc/cpuinfo
# names it. ggml's AVX512 level needs F, CD, VL, DQ and BW together.
AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
VARIANT_NEEDS = {
    "x64": (), "sse42": ("sse4_2",), "sandybridge": ("sse4_2", "avx"), "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"), "haswell": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"),
    "skylakex": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", *AVX512),
    "cannonlake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", *AVX512, "avx512vbmi"),
    "cascadelake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", *AVX512, "avx512_vnni"),
    "icelake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", *AVX512, "avx512vbmi", "avx512_vnni"),
    "cooperlake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", *AVX512, "avx512_vnni", "avx512_bf16"),
    "zen4": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", *AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni"),
    "sapphirerapids": ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", *AVX512, "avx512vbmi", "avx512_vnni",
                       "avx512_bf16", "amx_tile", "amx_int8"),
}
STARTUP_LINE = r"^CPU backend: (\S+) \(([^)]*)\)"

pytestmark = pytest.mark.skipif(not glob.glob(os.path.join(VARIANTS_LIB, "libggml-cpu-*.so")),
                                reason="no all-variants build: run tests/install.sh")


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def built_variants(folder: str = VARIANTS_LIB) -> set[str]:
    return {re.sub(r"^libggml-cpu-|\.so$", "", os.path.basename(p))
            for p in glob.glob(os.path.join(folder, "libggml-cpu-*.so"))}


def best_variants_for(flags: set[str], built: set[str]) -> set[str]:
    """The variants this CPU runs that no other runnable one outdoes (a strict superset of its needs)."""
    runnable = {v for v in built if set(VARIANT_NEEDS[v]) <= flags}
    return {v for v in runnable if not any(set(VARIANT_NEEDS[v]) < set(VARIANT_NEEDS[w]) for w in runnable)}


EMULATED_STARTUP = 600      # seconds: Python, the model and the first steps, all emulated


def variants_server(model: str, *args, command: list[str], lib: str = VARIANTS_LIB,
                    startup_timeout: float = 120) -> ServerProcess:
    return ServerProcess(["--model", model, "--contextsize", "256", "--threads", "1", *args],
                         env={"LLAMA_CPP_LIB_PATH": lib, **NO_VULKAN_DRIVER}, command=command,
                         startup_timeout=startup_timeout)


def greedy(server: ServerProcess, n: int = 3) -> dict:
    status, _, body = server.request("POST", "/v1/completions", {"prompt": "The capital of France is",
                                                                 "max_tokens": n, "temperature": 0}, timeout=600)
    assert status == 200, body
    return json.loads(body)


def test_every_variant_is_built():
    """The build carries every x86 level from the baseline up (what the executables pack)."""
    assert built_variants() == set(VARIANT_NEEDS)


def test_natively_the_best_variant_for_this_cpu_is_loaded(starter_model):
    s = variants_server(starter_model, command=[*program_command(), "--port", "0"])
    try:
        line = s.wait_for_line(STARTUP_LINE)
        assert line.group(1) in best_variants_for(cpu_flags(), built_variants()), line.string
        props = s.json("GET", "/props")
        assert props["cpu_backend"]["variant"] == line.group(1)
        assert props["cpu_backend"]["library"] == f"libggml-cpu-{line.group(1)}.so"      # its name, never a path
        assert props["cpu_backend"]["openmp"] is True and props["threads"]["wait"]["in_force"] is True
        assert greedy(s)["choices"][0]["text"]
    finally:
        s.stop()


def test_pip_build_reports_its_built_in_cpu_backend(starter_model):
    s = variants_server(starter_model, lib=PIP_LLAMA_LIB, command=[*program_command(), "--port", "0"])
    try:
        line = s.wait_for_line(STARTUP_LINE)
        assert line.group(1) == "built-in" and "SSE3" in line.group(2)
        cpu = s.json("GET", "/props")["cpu_backend"]
        assert cpu["variant"] == "built-in" and cpu["openmp"] is True       # pip's build runs OpenMP's threads
    finally:
        s.stop()


def requirements() -> list[tuple]:
    """requirements.txt as `pip install -r` reads it (pip's own parser): each line's requirement and config settings."""
    from pip._internal.network.session import PipSession
    from pip._internal.req.req_file import parse_requirements
    from packaging.requirements import Requirement

    return [(Requirement(parsed.requirement), parsed.options.get("config_settings", {}))
            for parsed in parse_requirements(os.path.join(ROOT, "requirements.txt"), session=PipSession())]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")    # pip's vendored pkg_resources, on import
def test_the_llama_cpp_build_script_reads_the_one_pin_of_requirements():
    """tools/build_llama_lib.sh builds the source of the llama-cpp-python version requirements.txt pins (its C API
    is the one koboldlite.py calls): its own line that reads the pin, run as it stands, gives the version pip
    reads, which every llama-cpp-python line has (one line per platform)."""
    pins = {str(req.specifier) for req, _ in requirements() if req.name == "llama-cpp-python"}
    assert len(pins) == 1, pins
    with open(os.path.join(ROOT, "tools", "build_llama_lib.sh")) as f:
        line = next(line for line in f if line.startswith("pin="))
    read = subprocess.run(["bash", "-c", f'root="$1"\n{line}\nprintf %s "$pin"', "bash", ROOT],
                          capture_output=True, text=True, check=True).stdout
    assert pins == {f"=={read}"}


REQUIREMENTS_PLATFORMS = {          # (sys_platform, platform_machine) -> pip's build tuned for no one CPU model
    ("linux", "x86_64"): True, ("darwin", "x86_64"): True,
    ("win32", "AMD64"): False, ("linux", "aarch64"): False, ("darwin", "arm64"): False,
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")    # pip's vendored pkg_resources, on import
@pytest.mark.parametrize("platform, machine", REQUIREMENTS_PLATFORMS)
def test_requirements_build_pip_llama_cpp_tuned_for_no_one_cpu_on_x86_64(platform, machine):
    """pip's own parser reads requirements.txt as `pip install -r` does: on every platform exactly one pinned
    llama-cpp-python, and where GCC or Clang compiles it for x86-64, -mtune=generic beside ggml's -march=native
    (bench/README.md: "Tuned for one CPU" says why)."""
    from packaging.markers import default_environment

    env = {**default_environment(), "sys_platform": platform, "platform_machine": machine}
    chosen = [(req, settings) for req, settings in requirements() if req.marker is None or req.marker.evaluate(env)]
    llama = [(req, settings) for req, settings in chosen if req.name == "llama-cpp-python"]
    assert len(llama) == 1 and str(llama[0][0].specifier) == "==0.3.36", chosen
    settings = llama[0][1]
    if REQUIREMENTS_PLATFORMS[(platform, machine)]:
        assert settings == {"cmake.define.CMAKE_C_FLAGS": "-mtune=generic",
                            "cmake.define.CMAKE_CXX_FLAGS": "-mtune=generic"}
    else:
        assert settings == {}


@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (tests/install.sh installs it)")
@pytest.mark.parametrize("cpu, variant", [("Nehalem", "sse42"), ("SandyBridge", "sandybridge"),
                                          ("Haswell", "haswell")])
def test_an_emulated_older_cpu_loads_the_variant_it_allows_and_answers(starter_model, cpu, variant):
    # --nodraft: measuring draft step costs at start decodes a 64-token batch, minutes of emulated AVX2.
    s = variants_server(starter_model, "--nodraft", command=[QEMU, "-cpu", cpu, sys.executable,
                                                             *program_command()[1:], "--port", "0"],
                        startup_timeout=EMULATED_STARTUP)
    try:
        line = s.wait_for_line(STARTUP_LINE)
        assert line.group(1) == variant, line.string
        out = greedy(s, 2)
        assert out["choices"][0]["text"] and out["usage"]["completion_tokens"] == 2
    finally:
        s.stop()


@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (tests/install.sh installs it)")
def test_no_variant_that_runs_is_a_clear_start_up_error(starter_model, tmp_path):
    """A copy of the build with only a variant this (emulated) CPU cannot run: the server says so and exits 2."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for path in glob.glob(os.path.join(VARIANTS_LIB, "*")):
        name = os.path.basename(path)
        if not name.startswith("libggml-cpu-") or name == "libggml-cpu-haswell.so":
            os.symlink(os.path.realpath(path), lib / name)
    p = WatchedProcess([QEMU, "-cpu", "Nehalem", sys.executable, *program_command()[1:], "--port", "0",
                        "--model", starter_model, "--contextsize", "256"],
                       env={"LLAMA_CPP_LIB_PATH": str(lib), **NO_VULKAN_DRIVER})
    try:
        p.wait_for_line(r"llama\.cpp found no CPU backend that runs on this computer .*ggml-cpu-haswell", timeout=300)
        assert p.proc.wait(120) == 2
    finally:
        p.stop()


def test_missing_variants_are_a_clear_start_up_error(starter_model, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for path in glob.glob(os.path.join(VARIANTS_LIB, "*")):
        if not os.path.basename(path).startswith("libggml-cpu-"):
            os.symlink(os.path.realpath(path), lib / os.path.basename(path))
    p = WatchedProcess([*program_command(), "--port", "0", "--model", starter_model],
                       env={"LLAMA_CPP_LIB_PATH": str(lib), **NO_VULKAN_DRIVER})
    try:
        p.wait_for_line(r"llama\.cpp found no CPU backend .*the ggml-cpu-\* files are missing")
        assert p.proc.wait(60) == 2
    finally:
        p.stop()


def test_a_gpu_module_without_its_driver_is_named_and_the_cpu_runs(starter_model):
    """The Vulkan module with no Vulkan driver to answer (here: the loader finds no driver file): start-up says
    so and the server runs on the CPU."""
    s = variants_server(starter_model, command=[*program_command(), "--port", "0"])
    try:
        assert any(re.match(r"^GPU: the vulkan backend is not in use \(no driver answered\): running on the CPU",
                            line) for line in s.lines), "\n".join(s.lines)
        assert s.json("GET", "/props")["gpu"]["layers_offloaded"] == 0
    finally:
        s.stop()


def test_without_the_vulkan_loader_the_module_is_named_with_the_reason(starter_model, tmp_path):
    """No libvulkan.so.1 at all (a PC without any Vulkan driver installed): the module cannot load; start-up
    names the linker's reason and runs on the CPU."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for path in glob.glob(os.path.join(VARIANTS_LIB, "*")):
        os.symlink(os.path.realpath(path), lib / os.path.basename(path))
    # An empty libvulkan.so.1 first on the library path stands for a missing one: dlopen fails on it.
    fake = tmp_path / "novulkan"
    fake.mkdir()
    (fake / "libvulkan.so.1").write_bytes(b"")
    s = ServerProcess(["--model", starter_model, "--contextsize", "256", "--threads", "1"],
                      env={"LLAMA_CPP_LIB_PATH": str(lib), "LD_LIBRARY_PATH": str(fake)},
                      command=[*program_command(), "--port", "0"])
    try:
        assert any(re.match(r"^GPU: the vulkan backend is not in use \(.*libvulkan\.so\.1.*\): running on the CPU",
                            line) for line in s.lines), "\n".join(s.lines)
        assert greedy(s, 1)["choices"][0]["text"] is not None
    finally:
        s.stop()


def test_the_variants_build_finds_its_own_ggml_beside_it():
    """What the executables pack binds to the ggml copied beside it, wherever that is ($ORIGIN), never to
    another build's found on a library path."""
    out = subprocess.run(["ldd", os.path.join(VARIANTS_LIB, "libllama.so")], capture_output=True, text=True).stdout
    ggml = re.search(r"libggml\.so\.0 => (\S+)", out)
    assert ggml and os.path.dirname(os.path.realpath(ggml.group(1))) == os.path.realpath(VARIANTS_LIB), out


def test_a_copy_without_links_runs(starter_model, tmp_path):
    """The build copied as plain files, as a one-file bundle or pip's wheel holds it (libggml.so and libggml.so.0
    two files, not a link), still runs. (Loaded as the executable loads it, with no LLAMA_CPP_LIB_PATH, such a
    folder once put the backends into a second ggml that libllama never saw: tests/test_exe.py covers that.)"""
    lib = tmp_path / "lib"
    shutil.copytree(VARIANTS_LIB, lib, symlinks=False)
    assert not any(os.path.islink(p) for p in lib.iterdir())
    s = variants_server(starter_model, command=[*program_command(), "--port", "0"], lib=str(lib))
    try:
        assert s.wait_for_line(STARTUP_LINE).group(1) in best_variants_for(cpu_flags(), built_variants())
        assert greedy(s, 1)["usage"]["completion_tokens"] == 1
    finally:
        s.stop()
