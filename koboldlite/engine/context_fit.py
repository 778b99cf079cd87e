"""The context a model gets when --contextsize does not say: the length it was trained for where memory allows,
else the longest that fits, never below 4096 (the old default). Today's clients need the room: Open WebUI sends
some 6,500 tokens of tools with every chat request, Claude Code about 21,000 tokens.

The service layer calls `choose_context` as it reads a model's options (ModelEntry.config), before loading: on the
CPU, the KV cache of every slot gets at most half of the RAM left free once the weights are in. Where the model
goes to a GPU, plan_gpu then calls `longest_context_on_gpu` so that the context does not push layers off it."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys

from .gguf_layout import KV_BYTES, GGUFLayout, fit_gpu_layers

DEFAULT_CONTEXT_FLOOR = 4096        # the default before contexts followed the model: never less
CONTEXT_STEP = 1024                 # a context that does not fit whole is cut to a multiple of this
RAM_SHARE = 0.5                     # of the RAM free once the weights are in, for the KV cache
RAM_CAP_ENV = "KOBOLDLITE_RAM_CAP_MIB"   # tests: cap the free RAM the choice sees


@dataclasses.dataclass
class ContextChoice:
    """A context size and the sentence that says why (start-up prints it)."""
    size: int
    reason: str


def available_ram() -> int | None:
    """Bytes of RAM free for new work (Linux's MemAvailable, Windows' available physical memory); None where
    unknown. RAM_CAP_ENV caps it."""
    found = None
    if sys.platform == "win32":
        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]
        status = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            found = int(status.ullAvailPhys)
    else:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        found = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    cap = os.environ.get(RAM_CAP_ENV, "")
    if cap.isdigit():
        found = min(found if found is not None else 1 << 62, int(cap) << 20)
    return found


def kv_bytes_per_token(layout: GGUFLayout, quantkv: int, copies: int) -> int:
    """The KV cache's bytes for one token of context, in `copies` caches (a cache per slot with --kvperslot)."""
    return int(layout.kv_width * layout.n_layer * KV_BYTES[quantkv]) * copies


def trained_context(layout: GGUFLayout) -> int:
    arch = layout.metadata.get("general.architecture", "")
    value = layout.metadata.get(f"{arch}.context_length", 0)
    return int(value) if isinstance(value, int) and value > 0 else 0


def choose_context(layout: GGUFLayout, model_bytes: int, quantkv: int, copies: int,
                   ram: int | None) -> ContextChoice:
    """The model's trained context if its KV cache fits in RAM_SHARE of the RAM left once the weights are in, else
    the longest multiple of CONTEXT_STEP that fits; never below DEFAULT_CONTEXT_FLOOR."""
    trained = trained_context(layout)
    if not trained:
        return ContextChoice(DEFAULT_CONTEXT_FLOOR, f"{DEFAULT_CONTEXT_FLOOR} tokens: the model does not say the "
                                                    f"context it was trained for")
    wanted = min(trained, 1 << 20)
    per_token = max(1, kv_bytes_per_token(layout, quantkv, copies))
    if ram is None:
        return ContextChoice(max(wanted, DEFAULT_CONTEXT_FLOOR), f"{wanted} tokens, as the model was trained "
                                                                 f"(free RAM unknown)")
    budget = int(max(0, ram - model_bytes) * RAM_SHARE)
    fits = budget // per_token
    mib = lambda tokens: (tokens * per_token) >> 20       # noqa: E731
    if fits >= wanted:
        return ContextChoice(max(wanted, DEFAULT_CONTEXT_FLOOR),
                             f"{wanted} tokens, as the model was trained: its KV cache takes {mib(wanted)} MiB of "
                             f"{ram >> 20} MiB free RAM")
    size = max(DEFAULT_CONTEXT_FLOOR, fits // CONTEXT_STEP * CONTEXT_STEP)
    return ContextChoice(size, f"{size} tokens of the {trained} the model was trained for: more would take over "
                               f"half of the {max(0, ram - model_bytes) >> 20} MiB of RAM free beside the weights")


def longest_context_on_gpu(layout: GGUFLayout, free: int, quantkv: int, copies: int, n_batch: int,
                           upto: int) -> int:
    """The longest context, at most `upto`, with which every layer still fits in `free` bytes of GPU memory; 0 when
    not even DEFAULT_CONTEXT_FLOOR lets them (then the fit offloads fewer layers at the floor)."""
    def all_fit(tokens: int) -> bool:
        layers, _ = fit_gpu_layers(layout, free, tokens * copies, quantkv, n_batch)
        return layers == layout.n_layer + 1
    if all_fit(upto):
        return upto
    lo, hi = 0, upto // CONTEXT_STEP            # in steps: lo fits (0 stands for "none"), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if all_fit(mid * CONTEXT_STEP):
            lo = mid
        else:
            hi = mid
    size = lo * CONTEXT_STEP
    return size if size >= DEFAULT_CONTEXT_FLOOR else 0
