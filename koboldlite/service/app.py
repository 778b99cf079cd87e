"""The App a route talks to, and the Responses API's stored responses."""

from __future__ import annotations

import collections
import hmac
import json
import queue
import sys
import threading
import time

from ..config import Config
from ..jobs import Job
from ..engine.llama_model import LlamaModel
from ..engine.embeddings import Embedder
from ..engine.cpu_threads import most_threads
from .catalog import ModelCatalog
from .served_model import ServedModel
from .roster import ModelRoster


class ResponseStore:
    """Responses kept for `previous_response_id`: least recently used out first, at most MAX_ITEMS of them and
    MAX_BYTES of their conversations' JSON; each readable only with the key (or no key) that made it."""

    MAX_ITEMS = 1024
    MAX_BYTES = 64 * 1024 * 1024

    def __init__(self):
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[str, tuple[str, dict, list[dict], int]] = collections.OrderedDict()
        self._bytes = 0

    def put(self, owner: str, response: dict, conversation: list[dict]):
        size = len(json.dumps([response, conversation]))
        if size > self.MAX_BYTES:
            return
        with self._lock:
            self._items[response["id"]] = (owner, response, conversation, size)
            self._bytes += size
            while len(self._items) > self.MAX_ITEMS or self._bytes > self.MAX_BYTES:
                _, (_, _, _, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get(self, owner: str, response_id: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            item = self._items.get(response_id)
            if item is None or not hmac.compare_digest(item[0], owner):
                return None
            self._items.move_to_end(response_id)
            return item[1], item[2]

    def delete(self, owner: str, response_id: str) -> bool:
        with self._lock:
            item = self._items.get(response_id)
            if item is None or not hmac.compare_digest(item[0], owner):
                return False
            del self._items[response_id]
            self._bytes -= item[3]
            return True


class App:
    """Everything a route needs: the config, the models by name and the roster that loads them."""

    def __init__(self, config: Config):
        self.config = config
        self.catalog = ModelCatalog(config)
        self.ready = threading.Event()                     # the default model was loaded once
        self.started = time.monotonic()
        self.instance_id = config.instance_id or ""
        self.responses = ResponseStore()                   # the Responses API's stored responses
        self.embeddings_source: LlamaModel | None = None   # --embeddings-model; else each model's own
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self.last_job: Job | None = None
        self.totals = collections.Counter()                # every model's jobs, for /metrics and perf
        self.cpu_policy: dict = {}                         # the wait policy and priority main set at start
        # Lines go to stderr from a thread of their own: the generation loop logs each job's end,
        # and a slow reader of stderr must never hold it up.
        self._log_lines: "queue.SimpleQueue[str | None]" = queue.SimpleQueue()
        self._logger = threading.Thread(target=self._write_log, name="log-writer", daemon=True)
        self._logger.start()
        self.roster = ModelRoster(self.catalog, config, self.log, self.log_finished)

    def embedder(self, served: ServedModel) -> Embedder:
        """--embeddings-model's context for every request, else the named model's own."""
        if self.embeddings_source is None:
            return served.embedder()
        with self._embedder_lock:
            if self._embedder is None:
                context = self.config.contextsize or Embedder.MAX_CONTEXT      # 0: the model's, cut as always
                self._embedder = Embedder.made_for(self.embeddings_source, context,
                                                   most_threads(self.config.threads), self.log)
            return self._embedder

    def find_job(self, genkey: str) -> tuple[Job, ServedModel] | None:
        """The job of this genkey (or the unkeyed one), and the loaded model that runs it."""
        for served in self.roster.any_loaded():
            job = served.scheduler.find(genkey)
            if job is not None:
                return job, served
        return None

    def abort(self, genkey: str) -> Job | None:
        for served in self.roster.any_loaded():
            job = served.scheduler.abort(genkey)
            if job is not None:
                return job
        return None

    def log_finished(self, job: Job):
        s = job.stats
        self.last_job = job
        self.totals.update(requests=1, prompt_tokens=s.prompt_tokens - s.cached_tokens,
                           prompt_seconds=s.prompt_seconds, generated_tokens=s.generated_tokens,
                           generation_seconds=s.generation_seconds, drafted_tokens=s.drafted_tokens,
                           draft_accepted=s.draft_accepted)
        self.totals[f"finished_{job.buffer.stop_reason.wire}"] += 1
        rate = s.generated_tokens / s.generation_seconds if s.generation_seconds else 0.0
        self.log(f"job {job.id} ended: {job.buffer.stop_reason.wire}, {s.prompt_tokens} prompt tokens "
                 f"({s.cached_tokens} cached) in {s.prompt_seconds:.2f}s, {s.generated_tokens} generated "
                 f"in {s.generation_seconds:.2f}s ({rate:.1f} tokens/s)"
                 + (f", drafts {s.draft_accepted}/{s.drafted_tokens} kept" if s.drafted_tokens else "")
                 + (f", cache from {s.cache_source}" if s.cache_source in ("ram", "disk") else "")
                 + (f", {s.media_chunks} media chunk(s) encoded in {s.media_seconds:.2f}s" if s.media_chunks else "")
                 + f", model {s.model}")

    def log(self, message: str):
        if not self.config.quiet:
            self._log_lines.put(message)

    def _write_log(self):
        while (line := self._log_lines.get()) is not None:
            # One write with its newline: print() writes the two apart, and stdout's lines (the main thread's
            # "Serving at ...") could land between them on a terminal or pipe that both share.
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def flush_log(self, timeout: float = 5.0):
        """At exit: write what is still queued."""
        self._log_lines.put(None)
        self._logger.join(timeout)
