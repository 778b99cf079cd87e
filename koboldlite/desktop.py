"""The double-click start of the one-file executable: settings or a model beside it, a file dialog, a
window that stays open on an error.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from .errors import ConfigError
from .model_files import find_starter_model


def is_double_click_start(argv: list[str]) -> bool:
    """The one-file executable started with no arguments, as a double-click starts it."""
    return bool(getattr(sys, "frozen", False)) and not argv


def double_click_arguments() -> list[str]:
    """Arguments for a double-click start: koboldlite.json beside the executable, else the one
    .gguf beside it (or the starter model), else the model the user picks in a file dialog."""
    here = os.path.dirname(os.path.abspath(sys.executable))
    browser = [] if os.environ.get("KOBOLDLITE_NO_BROWSER") else ["--launch"]
    settings = os.path.join(here, "koboldlite.json")
    if os.path.isfile(settings):
        print(f"Settings from {settings}", flush=True)
        return ["--config", settings] + browser
    models = sorted(glob.glob(os.path.join(here, "*.gguf")))
    if len(models) == 1:
        model = models[0]
    elif not models and find_starter_model():
        model = find_starter_model()
    else:
        model = choose_model_in_dialog(here, settings)
        if model is None:
            raise ConfigError("no model chosen: put one .gguf file beside koboldlite, or pass --model FILE")
    return ["--model", model] + browser


def choose_model_in_dialog(directory: str, settings_path: str) -> str | None:
    """A native file-open dialog; the choice may be kept in koboldlite.json."""
    try:
        import tkinter
        import tkinter.filedialog
        import tkinter.messagebox
        root = tkinter.Tk()
        root.withdraw()
    except Exception as e:  # no display, or a Python without Tk
        print(f"Cannot open a file dialog here ({e}).", file=sys.stderr)
        return None
    try:
        path = tkinter.filedialog.askopenfilename(
            title="KoboldLite: choose a GGUF model", initialdir=directory,
            filetypes=[("GGUF models", "*.gguf"), ("All files", "*.*")])
        if path and tkinter.messagebox.askyesno(
                "KoboldLite", "Use this model every time?\n(The choice is saved in koboldlite.json "
                              "beside the program.)"):
            with open(settings_path, "w", encoding="utf-8") as f:
                json.dump({"model": path}, f, indent=2)
        return path or None
    finally:
        root.destroy()


def keep_window_open():
    """A double-clicked console closes with the process: let the user read the error first."""
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            input("Press Enter to close this window.")
        except EOFError:
            pass
