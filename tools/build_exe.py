#!/usr/bin/env python3
"""Build the one-file executable with build_exe.spec and print its path and size.

    python3 tools/build_exe.py [--dist DIR]
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(dist: str, work: str) -> str:
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                    "--distpath", dist, "--workpath", work, os.path.join(ROOT, "build_exe.spec")],
                   check=True, cwd=ROOT)
    return os.path.join(dist, "koboldlite.exe" if os.name == "nt" else "koboldlite")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", default=os.path.join(ROOT, "dist"))
    ap.add_argument("--work", default=os.path.join(ROOT, "build"))
    args = ap.parse_args()
    t0 = time.monotonic()
    path = build(args.dist, args.work)
    size = os.path.getsize(path)
    print(f"{path}: {size / 2**20:.1f} MiB ({size} bytes), built in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
