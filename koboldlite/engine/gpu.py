"""GPUs: the devices the llama.cpp build's backends found, and the offload plan."""

from __future__ import annotations

import ctypes
import dataclasses
import os

from ..errors import ConfigError
from ..config import Config
from .llama_build import CPUBackend, GGMLRegistry, choose_build, ggml_library
from .threadpool import poll_level
from .gguf_layout import GGUFLayout, fit_gpu_layers
from .context_fit import DEFAULT_CONTEXT_FLOOR, longest_context_on_gpu


GPU_BUILD_HELP = ("build llama.cpp with a GPU backend beside the CPU one: bash tools/build_llama_lib.sh vulkan "
                  "(any GPU) or cuda (NVIDIA); README: GPUs")


@dataclasses.dataclass
class GPUDevice:
    index: int                # among all devices that are GPUs, in llama.cpp's order
    name: str                 # llama.cpp's: Vulkan0, CUDA0...
    description: str
    backend: str              # Vulkan, CUDA, Metal...
    free: int
    total: int
    handle: int               # ggml_backend_dev_t


class Devices:
    """The backends and GPU devices of the llama.cpp build that llama-cpp-python loaded (ggml's registry).

    A build with dynamic backend loading (tools/build_llama_lib.sh's, the executables') registers none until
    its backend modules are loaded from its folder; a module whose driver is missing (no NVIDIA driver) is
    skipped, so the CPU module still runs. ggml's Vulkan backend skips CPU-type devices (lavapipe) unless
    GGML_VK_VISIBLE_DEVICES names them."""

    GPU_TYPES = (1, 2)        # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU

    def __init__(self, registry: GGMLRegistry):
        registry.load_backends()
        self.registry, self.folder = registry, registry.folder
        self.backends = registry.backends
        self.gpus: list[GPUDevice] = []
        ggml, base = registry.ggml, registry.base
        for i in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(i)
            if base.ggml_backend_dev_type(dev) not in self.GPU_TYPES:
                continue
            free, total = self.memory(dev)
            self.gpus.append(GPUDevice(
                len(self.gpus), base.ggml_backend_dev_name(dev).decode(),
                (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                base.ggml_backend_reg_name(base.ggml_backend_dev_backend_reg(dev)).decode(), free, total, dev))

    def memory(self, dev: int) -> tuple[int, int]:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.registry.base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    BACKEND_FILES = {"vulkan": "Vulkan", "cuda": "CUDA", "metal": "Metal", "hip": "ROCm", "sycl": "SYCL"}

    @property
    def gpu_backends(self) -> list[str]:
        """The GPU backends this build carries, whether or not they found a device: a Vulkan backend with no
        driver at all registers nothing, but its library is there."""
        found = [b for b in self.backends if b not in ("CPU", "BLAS", "RPC")]
        for stem, name in self.BACKEND_FILES.items():
            if name not in found and ggml_library(self.folder, f"ggml-{stem}") is not None:
                found.append(name)
        return found

    def choose(self, backend: str | None, ids: list[int] | None) -> list[GPUDevice]:
        """The devices a request for a backend (and device numbers within it) names; a ConfigError if none."""
        pool = [d for d in self.gpus if backend is None or d.backend.lower() == backend.lower()]
        if backend is not None and not any(b.lower() == backend.lower() for b in self.gpu_backends):
            raise ConfigError(f"this llama.cpp build has no {backend} backend (it has: "
                              f"{', '.join(self.backends) or 'none'}); {GPU_BUILD_HELP}")
        if backend is not None and not pool:
            raise ConfigError(f"the {backend} backend found no usable device (a driver missing, or a CPU-type "
                              f"device such as lavapipe, which ggml uses only when GGML_VK_VISIBLE_DEVICES names it)")
        if ids:
            bad = [i for i in ids if not 0 <= i < len(pool)]
            if bad:
                raise ConfigError(f"no {backend or 'GPU'} device {bad[0]}: the devices are "
                                  + ", ".join(f"{k} {d.name} ({d.description})" for k, d in enumerate(pool)))
            pool = [pool[i] for i in ids]
        return pool


@dataclasses.dataclass
class GPUPlan:
    """Where the model goes: the layers to offload, the devices chosen (none: llama.cpp's default, all),
    and what start-up says about it."""
    n_gpu_layers: int = 0
    devices: list[GPUDevice] = dataclasses.field(default_factory=list)
    chosen: bool = False                 # devices named by --usevulkan/--usecuda (else llama.cpp takes all)
    backends: list[str] = dataclasses.field(default_factory=list)
    cpu: CPUBackend | None = None         # the CPU code llama.cpp runs (a variant module, or pip's built-in one)
    fit: dict | None = None              # the automatic fit's arithmetic
    contextsize: int = 0                 # a chosen context shortened to fit the GPU (0: as configured)
    lines: list[str] = dataclasses.field(default_factory=list)

    def report(self, memory: dict) -> dict:
        """For /props, /api/extra/perf and /api/ps: devices, layers, and MiB per device as llama.cpp allocated."""
        on_gpu = {name: parts for name, parts in memory["devices"].items()
                  if not name.startswith("CPU") and not name.endswith("_Host")}
        return {"backends": self.backends, "cpu": self.cpu.report() if self.cpu else None,
                "auto": self.fit is not None, "fit": self.fit,
                "devices": [{"name": d.name, "description": d.description, "backend": d.backend,
                             "free_mib": d.free >> 20, "total_mib": d.total >> 20} for d in self.devices],
                "layers_offloaded": memory["layers_offloaded"], "layers_total": memory["layers_total"],
                "vram_mib": round(sum(sum(parts.values()) for parts in on_gpu.values()), 2),
                "buffers_mib": memory["devices"]}


FIT_FREE_CAP_ENV = "KOBOLDLITE_FIT_FREE_MIB"    # tests: cap the free memory the automatic fit sees


def plan_gpu(config: Config, context_chosen: bool = False) -> GPUPlan:
    """Find the build's GPU devices and decide the offload: --gpulayers if given, else as many layers as fit.
    `context_chosen`: config.contextsize was chosen for the model, not given: where it would push layers off the
    GPU, the plan shortens it (plan.contextsize)."""
    choose_build()
    import llama_cpp
    registry = GGMLRegistry(llama_cpp)
    found = Devices(registry)
    plan = GPUPlan(backends=found.backends, cpu=registry.cpu_backend())
    plan.lines.append(plan.cpu.describe() + (f" [{plan.cpu.library}]" if plan.cpu.library else ""))
    if plan.cpu.extra_buffers_fault:
        plan.lines.append(f"CPU: llama.cpp's AMX and repacked weight layouts are off: {plan.cpu.extra_buffers_fault}")
    if plan.cpu.openmp is False:
        poll = poll_level(config.cpuwait)
        plan.lines.append(f"CPU: this build runs ggml's own threads, not OpenMP's: they run in threadpools of "
                          f"KoboldLite's own, polling between decodes at ggml's level {poll} "
                          f"(--cpuwait {config.cpuwait})")
    not_loaded = registry.modules_not_loaded()
    for module, why in not_loaded.items():
        plan.lines.append(f"GPU: the {module} backend is not in use ({why}): running on the CPU")
    backend = "Vulkan" if config.usevulkan is not None else "CUDA" if config.usecuda is not None else None
    if (backend or config.tensor_split or config.maingpu is not None) and not found.gpu_backends:
        option = ("--usevulkan" if config.usevulkan is not None else "--usecuda" if config.usecuda is not None
                  else "--tensor_split" if config.tensor_split else "--maingpu")
        raise ConfigError(f"{option}: this llama.cpp build runs on the CPU only; {GPU_BUILD_HELP}")
    if not found.gpu_backends:
        if config.gpulayers not in (None, 0):
            plan.lines.append(f"GPU: this llama.cpp build runs on the CPU only, so --gpulayers does nothing; "
                              f"{GPU_BUILD_HELP}")
        return plan
    ids = config.usevulkan or [int(w) for w in config.usecuda or () if str(w).isdigit()]
    plan.devices = found.choose(backend, ids) if backend else list(found.gpus)
    plan.chosen = backend is not None
    if not plan.devices:
        if not not_loaded:
            plan.lines.append(f"GPU: the {'/'.join(found.gpu_backends)} backend found no usable device (no driver, "
                              f"or only CPU-type devices): running on the CPU")
        return plan
    for d in plan.devices:
        plan.lines.append(f"GPU: {d.name} ({d.description}, {d.backend}): {d.free >> 20} MiB free of "
                          f"{d.total >> 20} MiB")
    if config.gpulayers is not None:
        plan.n_gpu_layers = config.gpulayers
        return plan
    free = sum(d.free for d in plan.devices)
    if os.environ.get(FIT_FREE_CAP_ENV, "").isdigit():
        free = min(free, int(os.environ[FIT_FREE_CAP_ENV]) << 20)
    layout = GGUFLayout(config.model)
    copies = config.parallel if config.kvperslot else 1
    if context_chosen:
        fits = longest_context_on_gpu(layout, free, config.quantkv, copies, config.batchsize, config.contextsize)
        shorter = fits or min(config.contextsize, DEFAULT_CONTEXT_FLOOR)
        if shorter < config.contextsize:
            plan.contextsize = shorter
            plan.lines.append(f"GPU: context {shorter} tokens, not {config.contextsize}, so that "
                              f"{'every layer fits' if fits else 'more layers fit'}; --contextsize N chooses")
    cells = (plan.contextsize or config.contextsize) * copies
    plan.n_gpu_layers, plan.fit = fit_gpu_layers(layout, free, cells, config.quantkv, config.batchsize)
    plan.fit["layers"] = plan.n_gpu_layers
    plan.lines.append(f"GPU: {plan.n_gpu_layers} of {layout.n_layer + 1} layers (with the output layer) fit in "
                      f"{plan.fit['free_mib']} MiB free: {plan.fit['planned_mib']} MiB of weights and KV cache, "
                      f"{plan.fit['margin_mib']} MiB kept for compute buffers; --gpulayers N chooses")
    return plan
