#!/usr/bin/env python3
"""Build the one-file executable with build_exe.spec and print its path and size.

    python3 tools/build_exe.py [--dist DIR] [--kind vulkan|cuda|cpu|native]

The executable carries llama.cpp built by tools/build_llama_lib.sh (built now unless it was already): every CPU
variant, of which the best for the machine it runs on is loaded at start, and by kind
  vulkan (default)  koboldlite[.exe]: and the Vulkan backend, for any NVIDIA, AMD or Intel GPU; on the CPU where
                    no Vulkan driver answers
  cuda              koboldlite-cuda[.exe]: and the CUDA backend, for NVIDIA users who want it
  cpu               koboldlite-cpu[.exe]: the CPU variants alone
  native            koboldlite-native[.exe]: pip's llama-cpp-python as installed, compiled for this machine's CPU
                    (fastest here; may die with "Illegal instruction" on an older CPU)
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"vulkan": "koboldlite", "cuda": "koboldlite-cuda", "cpu": "koboldlite-cpu", "native": "koboldlite-native"}


def llama_library(kind: str) -> str:
    """The folder of llama.cpp built for that kind (tools/build_llama_lib.sh), built now if it is not there yet."""
    folder = os.path.join(ROOT, f".llama-{kind}", "lib")
    built = os.path.isdir(folder) and any(n.startswith(("libggml-cpu-", "ggml-cpu-")) for n in os.listdir(folder))
    if not built:
        subprocess.run(["bash", os.path.join(ROOT, "tools", "build_llama_lib.sh"), kind, folder], check=True)
    return folder


def build(dist: str, work: str, kind: str = "vulkan") -> str:
    env = dict(os.environ, KOBOLDLITE_EXE_NAME=NAMES[kind])
    if kind != "native":
        env["KOBOLDLITE_LLAMA_LIB"] = llama_library(kind)
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                    "--distpath", dist, "--workpath", work, os.path.join(ROOT, "build_exe.spec")],
                   check=True, cwd=ROOT, env=env)
    return os.path.join(dist, NAMES[kind] + (".exe" if os.name == "nt" else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", default=os.path.join(ROOT, "dist"))
    ap.add_argument("--work", default=os.path.join(ROOT, "build"))
    ap.add_argument("--kind", choices=tuple(NAMES), default="vulkan", help="which llama.cpp build it carries")
    args = ap.parse_args()
    t0 = time.monotonic()
    path = build(args.dist, args.work, args.kind)
    size = os.path.getsize(path)
    print(f"{path}: {size / 2**20:.1f} MiB ({size} bytes), built in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
