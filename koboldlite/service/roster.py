"""The loaded models: load on demand, seats, idle unloading."""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from ..errors import ConfigError, ModelLoadError, ModelLoadFailed, Unavailable
from ..config import Config
from ..jobs import Job
from .catalog import ModelCatalog, ModelEntry
from .served_model import ServedModel, available_memory


class ModelRoster:
    """The loaded models: load on demand, the --maxmodels seats, and unloading models idle past their
    keep-alive. Loads happen one at a time (llama.cpp's log has one callback) on the requesting thread;
    requests for a model that is loading wait on the condition, others go on being served."""

    def __init__(self, catalog: ModelCatalog, config: Config, log: Callable[[str], None],
                 on_job_finished: Callable[[Job], None]):
        """`config`: the server's options (each model's preset goes over them); `on_job_finished` is told of every
        job's end, on its model's generation thread."""
        self.catalog = catalog
        self.config = config
        self.log = log
        self.on_job_finished = on_job_finished
        self._cond = threading.Condition()
        self.loaded: dict[str, ServedModel] = {}
        self.loading: set[str] = set()
        self.failures: dict[str, str] = {}       # the last load error of each model, for listings
        self.events: collections.deque[dict] = collections.deque(maxlen=64)   # loads and unloads, for perf
        self._load_lock = threading.Lock()
        self._stopping = False
        self._reaper = threading.Thread(target=self._reap, name="idle-unload", daemon=True)
        self._reaper.start()

    # -- request threads ------------------------------------------------------------------------------

    def state_of(self, name: str) -> str:
        with self._cond:
            served = self.loaded.get(name)
            return ("unloading" if served.unloading else "loaded") if served else \
                "loading" if name in self.loading else "unloaded"

    def current(self, name: str | None = None) -> ServedModel | None:
        """The loaded model of this name (default: the default one), without loading anything."""
        with self._cond:
            served = self.loaded.get(name or self.catalog.default_name)
            return served if served and not served.unloading else None

    def any_loaded(self) -> list[ServedModel]:
        with self._cond:
            return [s for s in self.loaded.values() if not s.unloading]

    def acquire(self, entry: ModelEntry) -> ServedModel:
        """The loaded model, loading it first if need be; the caller must release() it."""
        with self._cond:
            while True:
                if self._stopping:
                    raise Unavailable("the server is shutting down")
                served = self.loaded.get(entry.name)
                if served and not served.unloading:
                    served.leases += 1
                    served.last_used = time.monotonic()
                    return served
                if served is None and entry.name not in self.loading:
                    victims = self._make_room(entry)
                    if victims is not None:
                        break
                self._cond.wait()
            self.loading.add(entry.name)
            for victim in victims:
                victim.unloading = True
        for victim in victims:
            self._unload(victim, f"to make room for {entry.name}")
        try:
            with self._load_lock:
                served = ServedModel(entry, self.config, self.log, self.job_started, self._job_ended,
                                     named=self.catalog.several)
        except (ModelLoadError, ConfigError, OSError) as e:
            with self._cond:
                self.loading.discard(entry.name)
                self.failures[entry.name] = str(e)
                self._cond.notify_all()
            self.log(f"model {entry.name}: could not load: {e}")
            raise ModelLoadFailed(entry.name, e) from None
        self.log(f"model {entry.name} loaded in {served.load_seconds:.1f} s: {served.resident_mib:.0f} MiB "
                     f"(model {served.memory['model_mib']:.0f}, KV cache {served.memory['kv_cache_mib']:.0f}, "
                     f"compute {served.memory['compute_mib']:.0f}), context {served.model.n_ctx}, "
                     f"{served.placement}")
        with self._cond:
            self.loading.discard(entry.name)
            self.failures.pop(entry.name, None)
            served.leases = 1
            self.loaded[entry.name] = served
            self.events.append({"event": "load", "model": entry.name, "at": time.time(),
                                "seconds": round(served.load_seconds, 3), "mib": served.resident_mib})
            self._cond.notify_all()
        return served

    def hold(self, served: ServedModel) -> bool:
        """A lease on a model only if it is loaded now."""
        with self._cond:
            if self.loaded.get(served.name) is not served or served.unloading:
                return False
            served.leases += 1
            return True

    def release(self, served: ServedModel, keep_alive: float | None = None):
        """A request is done with the model; keep_alive (seconds, Ollama's) says how long it may then sit idle."""
        with self._cond:
            served.leases -= 1
            served.last_used = time.monotonic()
            if keep_alive is not None:
                served.keep_alive = keep_alive
            self._cond.notify_all()

    def touch(self):
        """Something a waiter or the reaper reads has changed (a keep-alive)."""
        with self._cond:
            self._cond.notify_all()

    def unload(self, name: str, reason: str) -> bool:
        """Unload now if it is idle; False if it is not loaded or in use."""
        with self._cond:
            served = self.loaded.get(name)
            if served is None or served.unloading or not self._idle(served):
                return False
            served.unloading = True
        self._unload(served, reason)
        return True

    def stop(self):
        with self._cond:
            self._stopping = True
            every = list(self.loaded.values())
            self._cond.notify_all()
        for served in every:
            served.scheduler.stop()
            served.save_conversations()

    # -- inside --------------------------------------------------------------------------------------

    def _idle(self, served: ServedModel) -> bool:
        # Its own counts, never the loop's lock: the loop calls _job_ended holding that lock.
        return served.leases == 0 and served.jobs == 0

    def _make_room(self, entry: ModelEntry) -> list[ServedModel] | None:
        """Holds _cond. The idle models to unload before this one loads ([]: none), or None: wait, every
        seat is held by a model in use. Memory is best effort: idle models go first while it looks short."""
        seated = [s for s in self.loaded.values() if not s.unloading]
        idle = sorted((s for s in seated if self._idle(s)), key=lambda s: s.last_used)
        short = len(seated) + len(self.loading) + 1 - self.config.maxmodels
        if short > len(idle):
            return None
        victims = idle[:max(short, 0)]
        free = available_memory()
        if free is not None:
            need = entry.estimated_bytes(self.config)
            spare = idle[len(victims):]
            freed = sum(v.entry.size_bytes for v in victims)
            while spare and need > free + freed:
                victims.append(spare.pop(0))
                freed += victims[-1].entry.size_bytes
        return victims

    def _unload(self, served: ServedModel, reason: str):
        """The model is marked unloading and idle: free it, then take it off the roster."""
        started = time.monotonic()
        mib = served.resident_mib
        served.close()
        seconds = time.monotonic() - started
        with self._cond:
            self.loaded.pop(served.name, None)
            self.events.append({"event": "unload", "model": served.name, "at": time.time(), "reason": reason,
                                "seconds": round(seconds, 3), "mib": mib})
            self._cond.notify_all()
        self.log(f"model {served.name} unloaded ({reason}) in {seconds:.2f} s: {mib:.0f} MiB freed")

    def job_started(self, served: ServedModel):
        with self._cond:
            served.jobs += 1

    def _job_ended(self, served: ServedModel, job: Job | None):
        """A job of this model has ended (None: the queue refused it, it never ran)."""
        if job is not None:
            self.on_job_finished(job)
        with self._cond:
            served.jobs -= 1
            served.last_used = time.monotonic()
            self._cond.notify_all()

    def keep_alive_of(self, served: ServedModel) -> float | None:
        """Seconds it may sit idle; None: for ever."""
        seconds = served.keep_alive if served.keep_alive is not None else (self.config.idleunload or None)
        return None if seconds is None or seconds < 0 else seconds

    def expires_at(self, served: ServedModel) -> float | None:
        """When (time.time()) an idle model will be unloaded; None: never, or not idle."""
        with self._cond:
            seconds = self.keep_alive_of(served)
            if seconds is None:
                return None
            return time.time() + max(0.0, served.last_used + seconds - time.monotonic()) if self._idle(served) \
                else time.time() + seconds

    def _reap(self):
        """Unload models idle past their keep-alive; sleeps on the condition until the next one is due."""
        with self._cond:
            while not self._stopping:
                now, due, expired = time.monotonic(), [], None
                for served in self.loaded.values():
                    seconds = self.keep_alive_of(served)
                    if served.unloading or seconds is None or not self._idle(served):
                        continue
                    if served.last_used + seconds <= now:
                        expired = served
                        break
                    due.append(served.last_used + seconds)
                if expired is None:
                    self._cond.wait(min(due) - now if due else None)
                    continue
                expired.unloading = True
                self._cond.release()
                try:
                    self._unload(expired, "keep_alive 0" if expired.keep_alive == 0 else
                                 f"idle {self.keep_alive_of(expired):g} s")
                finally:
                    self._cond.acquire()
