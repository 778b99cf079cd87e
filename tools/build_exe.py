#!/usr/bin/env python3
"""Build the one-file executable with build_exe.spec and print its path and size.

    python3 tools/build_exe.py [--dist DIR] [--gpu vulkan|cuda]

With --gpu, llama.cpp is built with that backend first (tools/build_llama_lib.sh, unless it was already) and the
executable carries it: koboldlite-vulkan[.exe] or koboldlite-cuda[.exe], which run on the CPU where no usable
GPU is found.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_library(backend: str) -> str:
    """The folder of llama.cpp built with that backend, built now if it is not there yet."""
    folder = os.path.join(ROOT, f".llama-{backend}", "lib")
    if not (os.path.isdir(folder) and any(n.startswith(("libllama.", "llama.")) for n in os.listdir(folder))):
        subprocess.run(["bash", os.path.join(ROOT, "tools", "build_llama_lib.sh"), backend, folder], check=True)
    return folder


def build(dist: str, work: str, gpu: str | None = None) -> str:
    env = dict(os.environ)
    name = "koboldlite"
    if gpu:
        name = f"koboldlite-{gpu}"
        env.update(KOBOLDLITE_GPU_LIB=gpu_library(gpu), KOBOLDLITE_EXE_NAME=name)
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                    "--distpath", dist, "--workpath", work, os.path.join(ROOT, "build_exe.spec")],
                   check=True, cwd=ROOT, env=env)
    return os.path.join(dist, name + (".exe" if os.name == "nt" else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", default=os.path.join(ROOT, "dist"))
    ap.add_argument("--work", default=os.path.join(ROOT, "build"))
    ap.add_argument("--gpu", choices=("vulkan", "cuda"), help="carry llama.cpp built with this GPU backend")
    args = ap.parse_args()
    t0 = time.monotonic()
    path = build(args.dist, args.work, args.gpu)
    size = os.path.getsize(path)
    print(f"{path}: {size / 2**20:.1f} MiB ({size} bytes), built in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
