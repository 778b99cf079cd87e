"""The models a request may name."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading

from ..errors import ConfigError, ModelLoadError
from ..model_files import SPLIT_GGUF, find_projector, model_name_of, scan_model_folder
from ..config import Config, read_presets
from ..engine.gguf_layout import GGUFLayout, KV_BYTES
from ..engine.context_fit import DEFAULT_CONTEXT_FLOOR, ContextChoice, available_ram, choose_context
from ..engine.projector import audio_abort_reason


# A request names a model, or gets the default one. The roster loads it beside the others while --maxmodels
# and the memory allow, else in place of the least recently used idle one; a model is unloaded only when no
# request holds it and its loop has nothing to run, so a swap never touches another model's stream.
@dataclasses.dataclass
class ModelEntry:
    """A model a request may name: its files (a split model has several), and the options of its preset."""
    name: str
    files: list[str]
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.files[0]           # llama.cpp finds a split model's other parts from its first

    @property
    def size_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files if os.path.isfile(f))

    @property
    def aliases(self) -> list[str]:
        return list(self.options.get("aliases", ()))

    def config(self, base: Config, context: ContextChoice | None = None) -> Config:
        """The server's options with this model's preset over them; a context left to choose is `context`, or chosen
        now (context_choice)."""
        # --mmproj names the default model's projector, --lora its adapters; another model's projector comes from its
        # preset or its folder, and it has no adapters (they are made for one model's shapes).
        default = self.path == base.model
        cfg = dataclasses.replace(base, **{"model": self.path, "mmproj": base.mmproj if default else None,
                                           "lora": list(base.lora) if default else [],
                                           **{k: v for k, v in self.options.items() if k != "aliases"}})
        if cfg.quantkv:
            cfg.flashattention, cfg.noflashattention = True, False
        if not cfg.contextsize:
            cfg.contextsize = (context or self._choose_context(cfg)).size
        per_request = cfg.contextsize // cfg.parallel if cfg.kvsplit else cfg.contextsize
        cfg.max_length = min(cfg.max_length, per_request // 2)
        return cfg

    def context_choice(self, base: Config) -> ContextChoice | None:
        """The context this model gets and why, when neither --contextsize nor its preset says (else None)."""
        cfg = dataclasses.replace(base, **{k: v for k, v in self.options.items() if k != "aliases"})
        return None if cfg.contextsize else self._choose_context(cfg)

    def _choose_context(self, cfg: Config) -> ContextChoice:
        layout = self.layout
        if layout is None:
            return ContextChoice(DEFAULT_CONTEXT_FLOOR, f"{DEFAULT_CONTEXT_FLOOR} tokens: the file's header could "
                                                        f"not be read")
        return choose_context(layout, self.size_bytes, cfg.quantkv, cfg.parallel if cfg.kvperslot else 1,
                              available_ram())

    @functools.cached_property
    def layout(self) -> "GGUFLayout | None":
        """The file's header, read once: what a listing says of a model that is not loaded."""
        try:
            return GGUFLayout(self.path)
        except (OSError, ModelLoadError):
            return None

    def modalities(self, base: Config) -> dict[str, bool]:
        """What its projector reads, by the projector file's header: what a listing says of a model not loaded."""
        cfg = self.config(base)
        path = cfg.mmproj or (None if cfg.nommproj else find_projector(self.path))
        try:
            meta = GGUFLayout(path).metadata if path else {}
        except (OSError, ModelLoadError):
            meta = {}
        return {"vision": bool(meta.get("clip.has_vision_encoder")), "audio": bool(meta.get("clip.has_audio_encoder"))
                and audio_abort_reason(meta) is None}

    def estimated_bytes(self, base: Config) -> int:
        """Weights plus KV cache at its context: what loading it will take, about."""
        cfg, layout = self.config(base), self.layout
        cells = cfg.contextsize * (cfg.parallel if cfg.kvperslot else 1)
        kv = int(cells * layout.kv_width * layout.n_layer * KV_BYTES[cfg.quantkv]) if layout else 0
        return self.size_bytes + kv


class ModelCatalog:
    """The models a request may name: the --model files and every GGUF in --modeldir, read again when asked
    for a name it does not know (a file copied in since) and for every listing."""

    def __init__(self, config: Config):
        self.folder = config.modeldir
        self.presets = read_presets(self.folder) if self.folder else {}
        self._lock = threading.Lock()
        self._given: dict[str, ModelEntry] = {}
        self._found: dict[str, ModelEntry] = {}
        for path in [config.model, *config.models]:
            self.add_file(path)
        self.initial_name = model_name_of(config.model)
        self.default_name = self.initial_name     # the Kobold API's model: the admin API may switch it
        self.rescan()

    def add_file(self, path: str) -> ModelEntry:
        name = model_name_of(path)
        with self._lock:
            known = self._given.get(name)
            if known and os.path.realpath(known.path) != os.path.realpath(path):
                raise ConfigError(f"two models are named {name}: {known.path} and {path}")
            folder = os.path.dirname(path) or "."
            files = scan_model_folder(folder).get(name, [path]) if SPLIT_GGUF.match(
                os.path.splitext(os.path.basename(path))[0]) else [path]
            entry = self._given[name] = ModelEntry(name, files, self.presets.get(name, {}))
            return entry

    def rescan(self):
        if not self.folder:
            return
        found = scan_model_folder(self.folder)
        with self._lock:
            self._found = {name: self._found[name] if name in self._found and self._found[name].files == files
                           else ModelEntry(name, files, self.presets.get(name, {}))
                           for name, files in found.items() if name not in self._given}

    def forget(self, name: str):
        """A model whose files were deleted."""
        with self._lock:
            self._given.pop(name, None)
            self._found.pop(name, None)

    def entries(self) -> list[ModelEntry]:
        """The default model first (clients that take the first listed get it), then by name."""
        with self._lock:
            every = {**self._found, **self._given}
        return sorted(every.values(), key=lambda e: (e.name != self.default_name, e.name.lower()))

    @property
    def several(self) -> bool:
        """With one model, any name a client sends means it (as with KoboldCpp and llama-server); with a
        folder or several models a name chooses, and a name that matches none is a 404."""
        return self.folder is not None or len(self.entries()) > 1

    def find(self, name: str | None) -> ModelEntry | None:
        """The model a request names: its name or an alias, in any case, with or without .gguf, Ollama's
        :latest or the koboldcpp/ that /api/v1/model puts in front. None: no such model, or a path."""
        if not name:
            return self.find(self.default_name)
        key = name.strip().lower().removeprefix("koboldcpp/").removesuffix(":latest").removesuffix(".gguf")
        if not key or "/" in key or "\\" in key or key in (".", ".."):
            return None
        for attempt in range(2):
            for entry in self.entries():
                if key == entry.name.lower() or key in (a.lower() for a in entry.aliases):
                    return entry
            if attempt == 0:
                self.rescan()
        return None
