"""Saved conversations: llama-server's /slots, KoboldCpp's admin states."""

from __future__ import annotations

import os
import re
import time

from ..errors import RequestError
from ..fields import FieldReader
from ..engine.prompt_cache import StateFileError, adapter_key_of, read_state_file
from ..engine.saved_slots import erase_slot, restore_latest, restore_slot, save_latest, save_slot
from ..service.served_model import ServedModel
from ..service.exchange import JSONResponse


SLOT_FILE_NAME = re.compile(r"[\w][\w.-]{0,199}")


def slots_list(app, req):
    """llama-server's GET /slots: each slot, whether it generates, how much it holds (no text)."""
    served = req.use(req.query.get("model"))
    return JSONResponse([{"id": s.seq_id, "n_ctx": served.model.n_ctx, "is_processing": s.busy,
                          "n_cached": len(s.cached)} for s in served.engine.slots])


def slot_file(app, f: FieldReader) -> tuple[str, str]:
    folder = app.config.slot_save_path
    if not folder:
        raise RequestError("saving slots is off: start with --slot-save-path DIR", status=501,
                           kind="not_supported_error")
    name = f.string("filename")
    if not SLOT_FILE_NAME.fullmatch(name) or ".." in name:
        raise RequestError("Invalid filename: a file name only, no path")
    return name, os.path.join(folder, name)


def slots_action(app, req):
    """llama-server's POST /slots/{id}?action=save|restore|erase, run on the generation loop between steps."""
    try:
        i = int(req.path.rsplit("/", 1)[1])
    except ValueError:
        raise RequestError("the slot id must be a number") from None
    action = req.query.get("action")
    served = req.use(req.query.get("model"))
    f = FieldReader(req.json(optional=True) or {})
    req.ignore_fields_but(f.body, "filename")
    started = time.monotonic()
    ms = lambda: round((time.monotonic() - started) * 1000, 3)    # noqa: E731
    if action == "erase":
        return JSONResponse({"id_slot": i, "n_erased": served.scheduler.call(lambda e: erase_slot(e, i))})
    if action == "save":
        name, path = slot_file(app, f)
        n, size = served.scheduler.call(lambda e: save_slot(e, i, path))
        app.log(f"slot {i}: {n} tokens saved to {name}")
        return JSONResponse({"id_slot": i, "filename": name, "n_saved": n, "n_written": size,
                             "timings": {"save_ms": ms()}})
    if action == "restore":
        name, path = slot_file(app, f)
        if not os.path.isfile(path):
            raise RequestError(f"no saved slot file {name!r}", status=404, kind="not_found")
        try:
            header, data = read_state_file(path, served.engine.identity)
        except StateFileError as e:
            raise RequestError(f"{name} cannot be restored here: {e}") from None
        n = served.scheduler.call(lambda e: restore_slot(e, i, header["tokens"], data, adapter_key_of(header)))
        app.log(f"slot {i}: {n} tokens restored from {name}")
        return JSONResponse({"id_slot": i, "filename": name, "n_restored": n, "n_read": len(data),
                             "timings": {"restore_ms": ms()}})
    raise RequestError("action must be save, restore or erase")


KOBOLD_STATE_SLOTS = 3       # KoboldCpp's admin API keeps this many saved states


def admin_state_slot(app, req) -> tuple[FieldReader, int, ServedModel]:
    if not app.config.admin:
        raise RequestError("the admin API is off: start with --admin", status=403, kind="forbidden")
    f = FieldReader(req.json(optional=True) or {})
    k = f.integer("slot", default=0)
    if not 0 <= k < KOBOLD_STATE_SLOTS:
        raise RequestError(f"'slot' must be 0 to {KOBOLD_STATE_SLOTS - 1}, not {k}")
    return f, k, req.use()


def admin_save_state(app, req):
    """The conversation used last (KoboldCpp has one context) into saved state N, in RAM."""
    f, k, served = admin_state_slot(app, req)

    saved = served.scheduler.call(save_latest)
    if saved is None:
        return JSONResponse({"success": False, "error": "no conversation to save"})
    served.saved_states[k] = saved
    return JSONResponse({"success": True, "new_state_size": len(saved[1]), "new_tokens": len(saved[0])})


def admin_load_state(app, req):
    """Saved state N back into the least recently used idle slot: the next prompt that continues it reads
    only what is new."""
    f, k, served = admin_state_slot(app, req)
    saved = served.saved_states.get(k)
    if saved is None:
        return JSONResponse({"success": False, "error": f"no saved state {k}"})
    n = served.scheduler.call(lambda engine: restore_latest(engine, *saved))
    return JSONResponse({"success": True, "new_state_size": len(saved[1]), "new_tokens": n})


def admin_check_state(app, req):
    f, k, served = admin_state_slot(app, req)
    return JSONResponse({"success": True, "old_states": [len(served.saved_states[i][0]) if i in served.saved_states
                                                         else 0 for i in range(KOBOLD_STATE_SLOTS)],
                         "new_state_size": len(served.saved_states[k][1]) if k in served.saved_states else 0,
                         "new_tokens": len(served.saved_states[k][0]) if k in served.saved_states else 0})


def admin_clear_state(app, req):
    f, k, served = admin_state_slot(app, req)
    served.saved_states.pop(k, None)
    return JSONResponse({"success": True})
