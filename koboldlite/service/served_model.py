"""One loaded model and what serves it."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

from ..errors import ModelLoadError
from ..config import Config, flash_attention_of, lora_adapters
from ..generation import GenerationRequest
from ..jobs import Job
from ..engine.gpu import plan_gpu
from ..engine.llama_model import LlamaModel
from ..engine.adapters import LoraAdapters
from ..engine.projector import Projector
from ..model_files import find_projector
from ..engine.embeddings import Embedder
from ..engine.drafting import DraftModel
from ..engine.prompt_cache import PromptCache
from ..engine.engine import Engine
from ..engine.cpu_threads import ThreadGovernor, most_threads
from ..engine.cpu_topology import logical_cpus, math_cores
from ..engine.threadpool import poll_level
from ..scheduler import Scheduler
from ..chat.template import load_chat_template
from .catalog import ModelEntry


class ProgressBar:
    """Model loading progress on stderr, redrawn only when a step of the bar fills."""

    WIDTH = 30

    def __init__(self):
        self._shown = -1

    def __call__(self, fraction: float):
        filled = int(fraction * self.WIDTH)
        if filled == self._shown:
            return
        self._shown = filled
        end = "\n" if filled >= self.WIDTH else ""
        print(f"\rLoading model [{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction * 100:3.0f}%",
              end=end, file=sys.stderr, flush=True)


def available_memory() -> int | None:
    """Bytes of RAM the system could still give (Linux: MemAvailable); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class ServedModel:
    """One loaded model and what serves it: its chat template, engine, generation loop and embedder."""

    def __init__(self, entry: ModelEntry, base: Config, log: Callable[[str], None],
                 job_started: Callable[["ServedModel"], None],
                 job_ended: Callable[["ServedModel", Job | None], None], named: bool = False):
        """Load it with its preset over the server's options (`base`). Its owner counts its jobs: `job_started` as
        one is queued, `job_ended` as it ends (with None for one the queue refused). `named`: requests choose
        among several models, so its log lines name it."""
        self.entry = entry
        self.name = entry.name
        context = entry.context_choice(base)
        self.config = cfg = entry.config(base, context)
        self.log = log
        self._job_started, self._job_ended = job_started, job_ended
        self.named = named
        started = time.monotonic()
        gpu = plan_gpu(cfg, context_chosen=context is not None)
        if gpu.contextsize:
            cfg.contextsize = gpu.contextsize
            cfg.max_length = min(cfg.max_length, cfg.contextsize // (cfg.parallel if cfg.kvsplit else 1) // 2)
        # Why the context is what it is, for start-up and /props.
        self.context_reason = "--contextsize or the model's preset" if context is None else context.reason \
            if not gpu.contextsize else f"{gpu.contextsize} tokens, so that the layers fit on the GPU (RAM " \
                                        f"allowed {context.size})"
        for line in gpu.lines + ([f"Context: {self.context_reason}; --contextsize N chooses"] if context else []):
            print(line, file=sys.stderr, flush=True)
        self.model = LlamaModel(cfg.model, n_ctx=cfg.contextsize, n_seq=cfg.parallel,
                                n_threads=most_threads(cfg.threads), n_gpu_layers=gpu.n_gpu_layers, n_batch=cfg.batchsize,
                                devices=gpu.devices if gpu.chosen else None, main_gpu=cfg.maingpu,
                                tensor_split=cfg.tensor_split, row_split="rowsplit" in (cfg.usecuda or ()),
                                shared_kv=not (cfg.kvperslot or cfg.kvsplit), split_kv=cfg.kvsplit,
                                flash_attention=flash_attention_of(cfg), quantkv=cfg.quantkv,
                                use_mmap=not cfg.nommap, use_mlock=cfg.usemlock,
                                progress=None if cfg.quiet else ProgressBar(), show_llama_log=cfg.debug,
                                threadpool_poll=poll_level(cfg.cpuwait),
                                threadpool_size=max(most_threads(cfg.threads), cfg.threadsbatch))
        try:
            self.chat_template, self.template_origin = load_chat_template(self.model, cfg.chat_template)
        except Exception:
            self.model.close()
            raise
        self.gpu = gpu
        try:
            self.adapters = LoraAdapters(self.model, lora_adapters(cfg))
        except ModelLoadError:
            self.model.close()
            raise
        for a in self.adapters.adapters:
            self.log(f"LoRA adapter {a.id}: {a.path} at scale {a.scale:g}")
        self.projector = self._projector(cfg, entry)
        self.memory = self.model.memory_report()
        self.gpu_info = gpu.report(self.memory)
        self.draft_model: DraftModel | None = None
        if cfg.draftmodel and not cfg.nodraft:
            try:
                self.draft_model = DraftModel(cfg.draftmodel, self.model, cfg.contextsize,
                                              most_threads(cfg.threads),
                                              gpu.n_gpu_layers if cfg.draftgpulayers is None else cfg.draftgpulayers,
                                              show_llama_log=cfg.debug)
            except ModelLoadError:
                if self.projector is not None:
                    self.projector.close()
                self.model.close()
                raise
        self._start_loop(cfg, log, job_ended)
        self.load_seconds = time.monotonic() - started
        self.leases = 0                          # requests using it now (the roster's count, under its lock)
        self.jobs = 0                            # its jobs not yet ended (so the roster never asks the loop)
        self.last_used = time.monotonic()
        self.keep_alive: float | None = None     # idle seconds before unloading, as the last request asked
        self.unloading = False
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self.saved_states: dict[int, tuple[list[int], bytes, tuple]] = {}   # admin save_state: tokens, state, LoRA

    def _start_loop(self, cfg: Config, log: Callable[[str], None],
                    job_ended: Callable[["ServedModel", Job | None], None]):
        """The prompt cache, the engine over the loaded parts, and the scheduler's loop thread, started; should the
        loop not start, the model is closed before the error goes on."""
        self.prompt_cache = self._prompt_cache(cfg)
        self.engine = Engine(self.model, context_shift=not cfg.noshift,
                             draft_most=0 if cfg.nodraft else cfg.draftamount, draft_model=self.draft_model,
                             prompt_cache=self.prompt_cache, log=log,
                             projector=self.projector,
                             threads=ThreadGovernor(math_cores(), cfg.threads, cfg.threadsbatch,
                                                    past_cores=self.model.openmp is True, cpus=logical_cpus()),
                             adapters=self.adapters)
        self.scheduler = Scheduler(self.engine, cfg.multiuser, lambda job: job_ended(self, job))
        try:
            self.scheduler.start()
        except ModelLoadError:
            self._close_model()
            raise

    def _projector(self, cfg: Config, entry: ModelEntry) -> Projector | None:
        """The model's multimodal projector: --mmproj (or its preset's), else one found beside the model file.
        One named that does not load fails the start; one found that does not fit this model is only skipped."""
        path = cfg.mmproj or (None if cfg.nommproj else find_projector(entry.path))
        if path is None:
            return None
        try:
            projector = Projector(path, self.model, n_threads=most_threads(cfg.threads),
                                  use_gpu=bool(self.gpu.devices) and not cfg.mmprojcpu)
        except ModelLoadError as e:
            if cfg.mmproj:
                self.model.close()
                raise
            self.log(f"{e}: found beside the model, skipped (--nommproj leaves it out)")
            return None
        self.log(projector.describe())
        return projector

    CACHE_CONTEXTS = 4       # the default RAM cache: this many full contexts of the model's KV cache...
    CACHE_RAM_SHARE = 4      # ...but at most a quarter of the memory the system has free

    def _prompt_cache(self, cfg: Config) -> PromptCache | None:
        """Displaced conversations: by default as many full contexts as a LAN with a few more conversations than
        slots brings back, from the model's own KV cost per token."""
        per_token = self.memory["kv_cache_mib"] * 2**20 / max(1, self.model.pool_tokens)
        if cfg.cacheram is None:
            ram = int(per_token * self.model.n_ctx * self.CACHE_CONTEXTS)
            free = available_memory()
            if free is not None:
                ram = min(ram, free // self.CACHE_RAM_SHARE)
        else:
            ram = cfg.cacheram << 20
        folder = os.path.join(cfg.cachedir, self.name) if cfg.cachedir else None    # one folder per model
        if not ram and not folder:
            return None
        cache = PromptCache(self.model, ram, folder, cfg.cachedisk << 20, self.log)
        self.log(f"prompt cache for {self.name}: up to {ram >> 20} MiB in RAM ({per_token / 1024:.0f} KiB a "
                     f"token)" + (f", {cfg.cachedisk} MiB on disk in {folder}" if folder else ""))
        return cache

    def save_conversations(self):
        """Unloading or stopping: every slot's conversation into the prompt cache, and RAM's onto disk.
        The loop has ended: this thread may use the context."""
        if self.prompt_cache is None:
            return
        for slot in self.engine.slots:
            self.engine.pool.stash(slot)
        self.prompt_cache.flush()

    @property
    def placement(self) -> str:
        """Where it runs, for the log."""
        m = self.memory
        return f"{m['layers_offloaded']}/{m['layers_total']} layers on the GPU" if self.gpu.devices else "on the CPU"

    @property
    def resident_mib(self) -> float:
        m = self.memory
        return round(m["model_mib"] + m["kv_cache_mib"] + m["compute_mib"], 1)

    def start_generation(self, request: GenerationRequest) -> Job:
        """Prepare and queue a generation (QueueFull when the queue is full: the 503 KoboldAI Lite understands)."""
        job = self.engine.prepare(request)
        job.stats.model = self.name
        self._job_started(self)
        try:
            self.scheduler.submit(job)
        except Exception:
            self._job_ended(self, None)
            raise
        position = self.scheduler.queue_position(job)     # 0 once the loop has taken it
        self.log(f"job {job.id}: {len(job.prompt_tokens)} prompt tokens, up to "
                 f"{job.max_new_tokens} new"
                 + (f", {job.stats.truncated_tokens} oldest prompt tokens cut to fit the context"
                    if job.stats.truncated_tokens else "")
                 + (f", genkey {job.genkey}" if job.genkey else "")
                 + (f", ignored fields: {', '.join(job.ignored_fields)}" if job.ignored_fields else "")
                 + (f", queued at {position}" if position else "")
                 + (f", model {self.name}" if self.named else ""))
        return job

    def embedder(self) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder.made_for(self.model, self.config.contextsize,
                                                   most_threads(self.config.threads), self.log)
            return self._embedder

    def close(self):
        """End the loop (it has nothing left to run: the roster saw to that) and free the memory."""
        self.scheduler.stop()
        self.save_conversations()
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
        self._close_model()

    def _close_model(self):
        if self.draft_model is not None:
            self.draft_model.close()
        if self.projector is not None:
            self.projector.close()
        self.model.close()
