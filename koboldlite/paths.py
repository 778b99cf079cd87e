"""Where the program's own files are, whichever form it runs in."""

from __future__ import annotations

import os
import sys


def program_folder() -> str:
    """The folder that holds the program's own files (embedded_ui/, a GPU build of llama.cpp in .llama-vulkan/lib):
    the one-file executable's bundle; else the folder of the koboldlite.py that was started, which is the launcher
    beside this package or the one file tools/build_single.py writes."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        return bundle
    here = os.path.dirname(os.path.abspath(__file__))
    # In the package this module is koboldlite.paths, a folder below the launcher; joined, it is the file itself.
    return os.path.dirname(here) if "." in __name__ else here
