"""Start-up and shutdown."""

from __future__ import annotations

import errno
import os
import signal
import socket
import ssl
import sys
import threading
import webbrowser
from typing import Callable

from .version import __version__
from .errors import ConfigError, ModelLoadError, ModelLoadFailed, ServiceError
from .model_files import is_model_url
from .config import Config, load_config, make_tls_context
from .desktop import double_click_arguments, is_double_click_start, keep_window_open
from .engine.llama_model import LlamaModel
from .engine.cpu_policy import Priority, WaitPolicy, apply_wait_policy, set_priority
from .engine.cpu_threads import ThreadMode
from .service.downloads import ConsoleProgress, DownloadError, ModelDownload
from .service.served_model import ServedModel
from .service.app import App
from .web.ui_files import ui_files
from .web.static import StaticFiles
from .web.routes import build_router
from .web.server import KoboldLiteServer, is_loopback_host, served_urls
from .web.handler import RequestHandler


def fetch_model_urls(config: Config):
    """--model URL: download each (with a bar on the console) before anything loads; the file stays."""
    folder = config.modeldir or os.getcwd()
    fetched = []
    for source in [config.model, *config.models]:
        if is_model_url(source):
            download = ModelDownload(source, folder)
            download.progress = ConsoleProgress(download.name)
            if not os.path.isfile(download.path):
                print(f"Downloading {source} into {folder}", file=sys.stderr, flush=True)
            source = download.run()
        fetched.append(source)
    config.model, config.models = fetched[0], fetched[1:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    double_click = is_double_click_start(argv)
    status = serve(double_click_arguments if double_click else lambda: argv, double_click)
    if status != 0 and double_click:
        keep_window_open()
    return status


class StartupError(Exception):
    """Start-up cannot go on: one line on stderr, exit status 2."""


def serve(arguments: Callable[[], list[str]], double_click: bool = False) -> int:
    """Each step of a run, in order: the configuration, the App, the listening socket (serving at once: the version
    endpoint answers while the model loads), the default model, the start-up report, then serving until a signal,
    and a clean stop."""
    server = None
    try:
        config, tls = configuration(arguments)
        cpu_policy = share_the_cpu(config)
        app = make_app(config)
        app.cpu_policy = cpu_policy
        server = listen(app, tls, double_click)
        stop = StopSignals()
        served = load_default_model(app)
        report_ready(app, server, served, tls)
    except StartupError as e:
        print(f"koboldlite: error: {e}", file=sys.stderr)
        if server is not None:
            server.server_close()
        return 2
    stop.wait()
    shut_down(app, server)
    return 0


def configuration(arguments: Callable[[], list[str]]) -> tuple[Config, ssl.SSLContext | None]:
    try:
        config = load_config(arguments())
        return config, make_tls_context(*config.ssl) if config.ssl else None
    except ConfigError as e:
        raise StartupError(e) from None


def share_the_cpu(config: Config) -> dict:
    """How llama.cpp's threads wait, and the process's priority (engine/cpu_policy.py): both before ggml is loaded
    and before any of its threads exist. What is in force, for /props and /api/extra/perf."""
    wait = apply_wait_policy(WaitPolicy(config.cpuwait))
    priority = Priority.HIGH if config.highpriority else Priority.LOW if config.lowpriority else Priority.NORMAL
    in_force, line = set_priority(priority)
    if line:
        print(line, file=sys.stderr, flush=True)
    return {"wait": wait, "priority": in_force.value}


def make_app(config: Config) -> App:
    """The App, once the models given as URLs are downloaded."""
    try:
        fetch_model_urls(config)
        return App(config)
    except (ConfigError, DownloadError) as e:
        raise StartupError(e) from None


def listen(app: App, tls: ssl.SSLContext | None, double_click: bool) -> KoboldLiteServer:
    """The server on its port (a double-click start takes a free port when that one is taken), serving already."""
    config = app.config
    page = ui_files()
    router = build_router(StaticFiles(page) if page else None)
    try:
        server = KoboldLiteServer((config.host, config.port), RequestHandler, app, router, tls)
    except OSError as e:
        if not (double_click and e.errno == errno.EADDRINUSE):
            reason = "the port is already in use" if e.errno == errno.EADDRINUSE else str(e)
            raise StartupError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
        # A double-click user cannot pick another port: take a free one and say so.
        print(f"Port {config.port} is in use; serving on a free port instead.", file=sys.stderr)
        server = KoboldLiteServer((config.host, 0), RequestHandler, app, router, tls)
    if not app.instance_id:
        app.instance_id = f"{socket.gethostname()}:{server.server_address[1]}"
    # Serve from now on: /api/extra/version answers while the model loads, the rest says 503.
    threading.Thread(target=server.serve_forever, name="http-accept", daemon=True).start()
    return server


class StopSignals:
    """SIGINT and SIGTERM, for the main thread to wait on (made by serve(), in the main thread, before the model
    loads; wait() blocks until one has come, at once if one came already).

    Why not an Event set by a Python-level handler: Python runs that handler in the main thread between bytecodes,
    and a signal that lands while the main thread is entering Event.wait itself is lost (the lock acquire that
    blocks began after the C-level handler ran, so the Python one never does) or deadlocks (the handler waits for
    the Condition's lock the main thread holds). Stopped at once after "Serving at", 1 start in 300 hung so, and
    the executable's SIGTERM test about 1 CI run in 9. The C-level handler writes the signal's number to a socket
    at once (signal.set_wakeup_fd), and the main thread blocks reading it: a byte written before the read waits."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)              # set_wakeup_fd's condition: a signal never blocks on it
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._noted)

    @staticmethod
    def _noted(signum, frame):
        """Python's own handler: nothing to do, the byte written to the socket wakes wait()."""

    def wait(self) -> int:
        """Block until SIGINT or SIGTERM has come (one that came earlier ends the wait at once): its number."""
        while True:
            for number in self._read.recv(64):
                if number in self.SIGNALS:
                    return number


def load_default_model(app: App) -> ServedModel:
    """The default model loaded (held: the caller releases it), and the embeddings model if one is given."""
    config, catalog = app.config, app.catalog
    entries = catalog.entries()
    if catalog.several:
        print(f"Models: {', '.join(e.name for e in entries)} ({len(entries)}; up to {config.maxmodels} loaded at "
              f"once{f', unloaded after {config.idleunload:g} s idle' if config.idleunload else ''})",
              file=sys.stderr, flush=True)
    print(f"KoboldLite {__version__}: loading {config.model}", file=sys.stderr, flush=True)
    try:
        served = app.roster.acquire(catalog.find(None))
    except ServiceError as e:
        app.flush_log()                   # its lines first: the error is the last line a user sees
        raise StartupError(e.cause if isinstance(e, ModelLoadFailed) else e) from None
    if config.embeddings_model:
        try:
            app.embeddings_source = LlamaModel(config.embeddings_model, n_ctx=64, n_seq=1, n_threads=1,
                                               n_gpu_layers=served.gpu.n_gpu_layers, show_llama_log=config.debug,
                                               devices=served.gpu.devices if served.gpu.chosen else None)
        except ModelLoadError as e:
            raise StartupError(f"embeddings model: {e}") from None
    return served


def report_ready(app: App, server: KoboldLiteServer, served: ServedModel, tls: ssl.SSLContext | None):
    """What was loaded and how, the warnings a LAN setup deserves, then ready: the URLs served."""
    config = app.config
    print(served.template_origin, file=sys.stderr, flush=True)
    if not served.engine.context_shift:
        print("context shift: off (--noshift)" if config.noshift else
              "context shift: off, this model's cache cannot be shifted: a trimmed chat is read again in "
              "full, and a reply ends when the context is full", file=sys.stderr, flush=True)
    if not is_loopback_host(config.host) and not config.password:
        print("WARNING: serving the network without --password: anyone who can reach this machine "
              "can use the model.", file=sys.stderr)
    if not is_loopback_host(config.host) and config.password and not tls:
        print("WARNING: the password crosses the network in clear text over plain HTTP: anyone on the network "
              "can read it; add --ssl cert.pem key.pem (README: Using it on your LAN, with TLS).", file=sys.stderr)
    report_memory(served)
    app.ready.set()
    app.roster.release(served)
    urls = served_urls(server, config.host)
    for url in urls:
        print(f"Serving at {url}", flush=True)
    print(f"KoboldAI API at {urls[0]}/api", flush=True)
    if config.launch:
        webbrowser.open(urls[0])


def report_memory(served: ServedModel):
    model, cfg, mem = served.model, served.config, served.memory
    gen = served.engine.threads.generation
    threads = f"{gen.most} threads" if gen.mode is ThreadMode.FIXED else f"up to {gen.most} threads (fewer while " \
        "other programs keep the cores busy)"
    print(f"Model {model.name} ready: context {model.n_ctx}, {cfg.parallel} slot(s), {threads}", flush=True)
    pool = (f"{mem['kv_cells']} tokens shared by {cfg.parallel} slot(s)" if model.shared_kv
            else f"{model.n_ctx} tokens for each of {cfg.parallel} slot(s)")
    print(f"Memory: model {mem['model_mib']:.0f} MiB, KV cache {mem['kv_cache_mib']:.0f} MiB ({pool}, "
          f"{'/'.join(mem['kv_types']) or model.kv_type}), compute buffers {mem['compute_mib']:.0f} MiB; "
          f"flash attention {mem['flash_attn'] or 'auto'}, model {mem['load_mode'] or 'loaded'}", flush=True)
    if served.gpu.devices:
        parts = "; ".join(f"{name}: model {row['model']:.0f} MiB, KV {row['kv']:.0f} MiB, compute {row['compute']:.0f} MiB"
                          for name, row in mem["devices"].items())
        print(f"GPU: offloaded {mem['layers_offloaded']}/{mem['layers_total']} layers; {parts}", flush=True)


def shut_down(app: App, server: KoboldLiteServer):
    """A signal came: running replies end (their streams write their last event), then the port is released."""
    print("Stopping: ending running generations.", file=sys.stderr, flush=True)
    app.roster.stop()
    server.wait_answers_written(timeout=5.0)
    server.shutdown()
    server.server_close()
    app.flush_log()
