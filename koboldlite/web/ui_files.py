"""The built-in page's files: embedded_ui/ beside the program. tools/build_single.py replaces this module in the
joined file with one that carries the files, so that the one file serves its page on its own."""

from __future__ import annotations

import os

from ..paths import program_folder


def ui_files() -> dict[str, bytes]:
    """Each file of the page by its path under embedded_ui/ ("index.html", "app.js"); none if the folder is missing."""
    folder = os.path.join(program_folder(), "embedded_ui")
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, folder).replace(os.sep, "/")] = f.read()
    return files
