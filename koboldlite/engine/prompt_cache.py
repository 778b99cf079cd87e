"""The prompt cache beyond the slots: displaced conversations' states in RAM and on disk."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
import time
import zlib
from typing import Callable

from .llama_model import LlamaModel, common_prefix_length


class SavedState:
    """One displaced conversation: its tokens and its sequence's state, in RAM (data), on disk (path), or both, and
    the LoRA scales it was computed under (`adapter_key`: only a prompt under the same scales may reuse it)."""

    def __init__(self, tokens: list[int], data: bytes | None, size: int, path: str | None = None,
                 adapter_key: tuple = ()):
        self.tokens = tokens
        self.adapter_key = adapter_key
        self.data = data
        self.size = size
        self.path = path
        self.last_used = time.monotonic()


STATE_MAGIC = b"KLKVSTATE1\n"


class StateFileError(Exception):
    pass


def write_state_file(path: str, identity: dict, tokens: list[int], data: bytes, adapter_key: tuple = ()):
    """A sequence's state after a header naming what made it, its tokens, the LoRA scales it was computed under and
    the state's hash; written whole under a temporary name, then renamed (a crash leaves the old file or none, never
    half of one)."""
    header = json.dumps({**identity, "tokens": list(tokens), "adapters": [list(pair) for pair in adapter_key],
                         "state_bytes": len(data),
                         "state_crc32": zlib.crc32(data)}).encode()
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(STATE_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def read_state_file(path: str, identity: dict, with_data: bool = True) -> tuple[dict, bytes | None]:
    """(header, state) of a state file made by this model in this layout; StateFileError says what is wrong."""
    try:
        with open(path, "rb") as f:
            if f.read(len(STATE_MAGIC)) != STATE_MAGIC:
                raise StateFileError("not a KoboldLite state file")
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 0 < length < 1 << 30 else None
            if not isinstance(header, dict) or not isinstance(header.get("tokens"), list):
                raise StateFileError("a damaged header")
            wrong = next((k for k, v in identity.items() if header.get(k) != v), None)
            if wrong:
                raise StateFileError(f"made by another model or layout ({wrong} differs)")
            if os.path.getsize(path) != len(STATE_MAGIC) + 8 + length + header.get("state_bytes", -1):
                raise StateFileError("cut short")
            data = f.read() if with_data else None
    except (OSError, ValueError, UnicodeDecodeError, TypeError) as e:
        raise StateFileError(f"unreadable ({e})") from None
    # A CRC-32 finds damage (it is no guard against forgery: the folder is the user's own) at memory speed.
    if data is not None and zlib.crc32(data) != header.get("state_crc32"):
        raise StateFileError("damaged (its checksum does not match)")
    return header, data


def adapter_key_of(header: dict) -> tuple:
    """The LoRA scales a state file's header says its state was computed under (none in files made before them)."""
    try:
        return tuple((str(name), float(scale)) for name, scale in header.get("adapters") or [])
    except (TypeError, ValueError):
        return (("unreadable", 1.0),)       # a damaged list: a key no request has, so never reused


def model_identity(model: "LlamaModel") -> dict:
    """What a saved state must have been made by: this model file (its size and a hash of its first MiB),
    this llama.cpp, this KV type, context and layout."""
    digest = hashlib.sha256()
    with open(model.path, "rb") as f:
        digest.update(f.read(1 << 20))
    return {"model_size": os.path.getsize(model.path), "model_head_sha256": digest.hexdigest(),
            "llama_cpp": getattr(model.lib, "__version__", ""), "kv_type": model.kv_type,
            "n_ctx": model.n_ctx, "pool_tokens": model.pool_tokens, "shared_kv": model.shared_kv,
            "n_seq": model.n_seq}


class PromptCache:
    """Conversations displaced from the slots, kept as their sequences' states (llama_state_seq_get_data): in
    host memory up to `ram_bytes`, least recently used first out; with a folder, also on disk up to `disk_bytes`,
    across restarts. A file holds one state after a header that names what made it (the model file's size and a
    hash of its first MiB, llama.cpp's version, the KV type, the context layout and size) and its tokens, and a
    checksum of the state: a file made by anything else, cut short or damaged is skipped with one log line and
    removed, never loaded. Files are written whole under a temporary name, then renamed."""

    MIN_TOKENS = 256          # shorter conversations are cheaper to read again than to keep

    def __init__(self, model: "LlamaModel", ram_bytes: int, folder: str | None, disk_bytes: int,
                 log: Callable[[str], None] = lambda line: None):
        self.ram_bytes, self.folder, self.disk_bytes, self.log = ram_bytes, folder, disk_bytes, log
        self.identity = model_identity(model)
        self.entries: list[SavedState] = []
        self.saved = collections.Counter()     # states copied in: ahead (idle slots) or when displaced
        self._lock = threading.Lock()          # request threads read the listing; the loop changes it
        if folder:
            os.makedirs(folder, exist_ok=True)
            self._read_index()

    # -- what it holds --------------------------------------------------------------------------------------

    def best(self, prompt: list[int], adapter_key: tuple = (),
             reused: Callable[[list[int], list[int]], int] = common_prefix_length) -> tuple[SavedState | None, int]:
        """The kept state computed under these LoRA scales that supplies most of the prompt, and how much:
        `reused(tokens, prompt)`, by default their common start (KVPool.plan_reuse counts the later runs a
        client kept after dropping older turns too)."""
        best, n = None, 0
        with self._lock:
            for entry in self.entries:
                if entry.adapter_key != adapter_key:
                    continue
                common = reused(entry.tokens, prompt)
                if common > n:
                    best, n = entry, common
        return best, n

    def keep(self, tokens: list[int], data: bytes, ahead: bool = False, adapter_key: tuple = ()):
        """A displaced conversation's state (`ahead`: one still in its idle slot, kept before it is displaced),
        computed under these LoRA scales. One that it extends, under the same scales, it replaces."""
        self.saved["ahead" if ahead else "when_displaced"] += 1
        entry = SavedState(list(tokens), data, len(data), adapter_key=adapter_key)
        with self._lock:
            for old in [e for e in self.entries if e.adapter_key == adapter_key
                        and common_prefix_length(e.tokens, tokens) == len(e.tokens)]:
                self.entries.remove(old)          # this one holds all it held, and more
                self._forget_file(old)
            self.entries.append(entry)
        self._bound()

    def data_of(self, entry: SavedState) -> bytes | None:
        """Its state, from RAM or read back from its file (checked); None if the file is gone or bad."""
        entry.last_used = time.monotonic()
        data, path = entry.data, entry.path
        if data is not None:
            return data
        if path is None:                 # dropped by the bound meanwhile
            return None
        read = self._read_file(path, with_data=True)
        if read is None:
            with self._lock:
                if entry in self.entries:
                    self.entries.remove(entry)
            return None
        return read[1]

    def taken(self, entry: SavedState):
        """Restored into a slot: the slot holds it now (it comes back here when displaced again)."""
        with self._lock:
            if entry in self.entries:
                self.entries.remove(entry)
        self._forget_file(entry)

    def holds(self, tokens: list[int], adapter_key: tuple = ()) -> bool:
        """Whether a kept state is exactly this conversation under these scales (kept ahead while it still held its
        slot)."""
        with self._lock:
            return any(e.tokens == tokens and e.adapter_key == adapter_key for e in self.entries)

    def report(self) -> dict:
        """What it holds and may hold, for /api/extra/perf: counts and MiB, no text."""
        with self._lock:
            entries = list(self.entries)
        return {"conversations": len(entries), "in_ram": sum(e.data is not None for e in entries),
                "on_disk": sum(e.path is not None for e in entries), "ram_mib": round(self.ram_used / 2**20, 1),
                "disk_mib": round(self.disk_used / 2**20, 1), "ram_limit_mib": self.ram_bytes >> 20,
                "disk_limit_mib": self.disk_bytes >> 20 if self.folder else 0,
                "saved_ahead": self.saved["ahead"], "saved_when_displaced": self.saved["when_displaced"]}

    @property
    def ram_used(self) -> int:
        with self._lock:
            return sum(e.size for e in self.entries if e.data is not None)

    @property
    def disk_used(self) -> int:
        with self._lock:
            return sum(e.size for e in self.entries if e.path is not None)

    def _bound(self):
        """RAM over its bound: the least recently used go to disk (with a folder) or are dropped; disk likewise."""
        with self._lock:
            in_ram = sorted((e for e in self.entries if e.data is not None), key=lambda e: e.last_used)
            used = sum(e.size for e in in_ram)
            leaving = []
            while used > self.ram_bytes and in_ram:
                e = in_ram.pop(0)
                used -= e.size
                leaving.append(e)
        for e in leaving:
            if self.folder and e.path is None and e.size <= self.disk_bytes:
                self._write_file(e)
            e.data = None
            if e.path is None:
                with self._lock:
                    if e in self.entries:
                        self.entries.remove(e)
        with self._lock:
            on_disk = sorted((e for e in self.entries if e.path is not None and e.data is None),
                             key=lambda e: e.last_used)
            used = sum(e.size for e in self.entries if e.path is not None)
            while used > self.disk_bytes and on_disk:
                e = on_disk.pop(0)
                used -= e.size
                self.entries.remove(e)
                self._forget_file(e)

    def flush(self):
        """At a clean shutdown: what is only in RAM goes to disk."""
        if not self.folder:
            return
        with self._lock:
            pending = [e for e in self.entries if e.path is None and e.data is not None]
        for e in sorted(pending, key=lambda e: -e.last_used):
            if self.disk_used + e.size <= self.disk_bytes:
                self._write_file(e)

    # -- files ---------------------------------------------------------------------------------------------

    def _write_file(self, e: SavedState):
        named = json.dumps([e.tokens, e.adapter_key]) if e.adapter_key else json.dumps(e.tokens)   # one file each
        path = os.path.join(self.folder, hashlib.sha256(named.encode()).hexdigest()[:24] + ".klstate")
        try:
            write_state_file(path, self.identity, e.tokens, e.data, e.adapter_key)
            e.path = path
        except OSError as error:
            self.log(f"prompt cache: could not write {path}: {error}")

    def _forget_file(self, e: SavedState):
        if e.path:
            with contextlib.suppress(OSError):
                os.remove(e.path)
            e.path = None

    def _read_file(self, path: str, with_data: bool) -> tuple[dict, bytes | None] | None:
        """(header, state) of a file made here, or None (after one log line, the file removed)."""
        try:
            return read_state_file(path, self.identity, with_data)
        except StateFileError as e:
            self.log(f"prompt cache: skipped {os.path.basename(path)}: {e}; removed")
            with contextlib.suppress(OSError):
                os.remove(path)
            return None

    def _read_index(self):
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            if name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(path)          # a write a crash cut short
                continue
            if not name.endswith(".klstate"):
                continue
            read = self._read_file(path, with_data=False)
            if read is not None and isinstance(read[0].get("tokens"), list):
                entry = SavedState(read[0]["tokens"], None, read[0]["state_bytes"], path, adapter_key_of(read[0]))
                entry.last_used = time.monotonic() - 1e6 + os.path.getmtime(path) / 1e4
                self.entries.append(entry)
        if self.entries:
            self.log(f"prompt cache: {len(self.entries)} conversation(s) on disk in {self.folder}")
        self._bound()
