"""Models by request: KoboldCpp's admin API, llama-server's router endpoints, Ollama's pull and delete."""

from __future__ import annotations

import json
import os
import queue
import threading

from ..errors import ConfigError, RequestError, ServiceError
from ..model_files import is_model_url, model_name_of, scan_model_folder
from ..fields import FieldReader
from ..service.downloads import DownloadError, ModelDownload
from ..service.catalog import ModelEntry
from ..service.exchange import JSONResponse, Response, StreamResponse


def download_folder(app) -> str:
    """Where downloads go: the models folder, or without one the folder the server was started in."""
    return app.config.modeldir or os.getcwd()


def add_downloaded(app, path: str) -> ModelEntry:
    if app.config.modeldir and os.path.dirname(os.path.abspath(path)) == os.path.abspath(app.config.modeldir):
        app.catalog.rescan()
        return app.catalog.find(model_name_of(path))
    return app.catalog.add_file(path)


def load_in_background(app, entry: ModelEntry):
    """Load a model for requests to come (the admin switch): the caller is answered at once."""
    def run():
        try:
            app.roster.release(app.roster.acquire(entry))
        except ServiceError:
            pass                         # logged by the roster; listings show the error
    threading.Thread(target=run, name=f"load-{entry.name}", daemon=True).start()


ADMIN_WORDS = ("unload_model", "initial_model")     # KoboldCpp's list_options entries that are not files


def admin_folder(app) -> str | None:
    return app.config.admindir or app.config.modeldir


def admin_list_options(app, req):
    """The model files the admin API may switch to, and KoboldCpp's two words; [] with admin mode off."""
    folder = admin_folder(app)
    if not app.config.admin or not folder:
        return JSONResponse([])
    files = sorted(os.path.basename(files[0]) for files in scan_model_folder(folder).values())
    return JSONResponse(files + list(ADMIN_WORDS))


def admin_reload_config(app, req):
    """Switch the Kobold API's model to a file of the admin folder (loaded in the background: the polling
    endpoints and /api/v1/model answer meanwhile); `unload_model` unloads it, `initial_model` goes back."""
    if not app.config.admin:
        raise RequestError("the admin API is off: start with --admin (and --admindir or --modeldir)", status=403,
                           kind="forbidden")
    f = FieldReader(req.json())
    req.ignore_fields_but(f.body, "filename")
    filename = f.string("filename")
    if filename == "unload_model":
        name = app.catalog.default_name
        if app.roster.current(name) is not None and not app.roster.unload(name, "admin unload_model"):
            raise RequestError(f"model {name} is busy: try again when its replies end", status=409, kind="conflict")
        return JSONResponse({"success": True})
    if filename == "initial_model":
        entry = app.catalog.find(app.catalog.initial_name)
    else:
        folder = admin_folder(app)
        if not folder:
            raise RequestError("no admin folder: start with --admindir or --modeldir", status=403, kind="forbidden")
        # By name, not by where links lead: a link the user put in the folder is his to choose.
        root = os.path.abspath(folder)
        path = os.path.normpath(os.path.join(root, filename))
        outside = os.path.isabs(filename) or os.path.commonpath([root, path]) != root or path == root
        if outside or "\0" in filename:
            raise RequestError("filename must name a file inside the admin folder", status=403, kind="forbidden")
        if not filename.lower().endswith(".gguf") or not os.path.isfile(path):
            raise RequestError(f"no model file {filename!r} in the admin folder (GET /api/admin/list_options)",
                               status=404, kind="not_found")
        try:
            entry = app.catalog.find(model_name_of(path))
            if entry is None or os.path.realpath(entry.path) != os.path.realpath(path):
                entry = app.catalog.add_file(path)
        except ConfigError as e:
            raise RequestError(str(e), status=409, kind="conflict") from None
    app.catalog.default_name = entry.name
    app.log(f"admin: the Kobold API's model is now {entry.name}")
    load_in_background(app, entry)
    return JSONResponse({"success": True})


def router_load(app, req):
    """llama-server's POST /models/load: load it now (the answer waits for the load)."""
    f = FieldReader(req.json())
    entry = req.entry(f.string("model"))
    app.roster.release(app.roster.acquire(entry))
    return JSONResponse({"success": True})


def router_unload(app, req):
    f = FieldReader(req.json())
    entry = req.entry(f.string("model"))
    if app.roster.current(entry.name) is None:
        raise RequestError(f"model {entry.name} is not loaded")
    if not app.roster.unload(entry.name, "asked by /models/unload"):
        raise RequestError(f"model {entry.name} is busy: try again when its replies end", status=409, kind="conflict")
    return JSONResponse({"success": True})


def ollama_pull(app, req):
    """Ollama's pull, for an http(s) URL of a GGUF file (there is no model registry here), with its NDJSON
    progress objects. A pull of a model already here is a success; a hang-up stops the download and a
    later pull resumes it."""
    f = FieldReader(req.json())
    req.ignore_fields_but(f.body, "model", "name", "stream")
    source = f.string("model", "name")
    if not is_model_url(source):
        if app.catalog.find(source) is not None:
            return JSONResponse({"status": "success"})
        raise RequestError(f'model "{source}" not found: this server pulls http(s) URLs of GGUF files (a Hugging '
                           f'Face .../resolve/main/FILE.gguf), it reaches no model registry', status=404,
                           kind="not_found")
    updates: "queue.Queue[dict | None]" = queue.Queue()
    stop = threading.Event()
    last = [-1]

    def progress(done: int, total: int):
        if stop.is_set():
            raise DownloadError("the client hung up")
        step = done * 100 // total if total else done >> 24
        if step != last[0] or done == total:
            last[0] = step
            updates.put({"status": f"pulling {download.name}", "digest": f"sha256:{download.sha256 or ''}",
                         "total": total, "completed": done})
    try:
        download = ModelDownload(source, download_folder(app), progress, lambda what: updates.put({"status": what}))
    except DownloadError as e:
        raise RequestError(str(e)) from None

    def run() -> dict:
        try:
            path = download.run()
        except DownloadError as e:
            return {"error": str(e)}
        entry = add_downloaded(app, path)
        app.log(f"pulled {source} into {path} ({entry.size_bytes >> 20} MiB)")
        return {"status": "success"}
    if not f.boolean("stream", default=True):
        result = run()
        if "error" in result:
            raise RequestError(result["error"], status=500, kind="server_error")
        return JSONResponse(result)

    def worker():
        updates.put(run())
        updates.put(None)
    threading.Thread(target=worker, name="pull", daemon=True).start()

    def lines():
        try:
            yield json.dumps({"status": "pulling manifest"}).encode() + b"\n"
            while (update := updates.get()) is not None:
                if update.get("status") == "success":
                    yield b"".join(json.dumps({"status": s}).encode() + b"\n" for s in ("writing manifest", "success"))
                else:
                    yield json.dumps(update).encode() + b"\n"
        finally:
            stop.set()
    return StreamResponse("application/x-ndjson", lines())


def ollama_delete(app, req):
    """Remove a model's files from the models folder (never a file outside it, never the default model)."""
    f = FieldReader(req.json())
    name = f.string("model", "name")
    entry = app.catalog.find(name) if app.catalog.several else None
    folder = os.path.realpath(app.config.modeldir) if app.config.modeldir else None
    if entry is None or folder is None or os.path.dirname(os.path.realpath(entry.path)) != folder:
        raise RequestError(f'model "{name}" not found in the models folder', status=404, kind="not_found")
    if entry.name == app.catalog.default_name:
        raise RequestError(f"model {entry.name} is the default model: it cannot be deleted", status=409,
                           kind="conflict")
    if app.roster.current(entry.name) is not None and not app.roster.unload(entry.name, "deleted"):
        raise RequestError(f"model {entry.name} is busy: try again when its replies end", status=409, kind="conflict")
    for file in entry.files:
        os.remove(file)
    app.catalog.forget(entry.name)
    app.log(f"deleted model {entry.name}: {', '.join(entry.files)}")
    return Response(200, b"", "application/json")
