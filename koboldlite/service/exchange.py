"""What a route sees of a request, and the Response it returns."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

from ..errors import Failed, ModelNotFound, RequestError
from ..generation import GenerationRequest
from ..jobs import Job, StopReason
from .catalog import ModelEntry
from .served_model import ServedModel
from .app import App


# Routes get a Request and return a Response; App holds the model, the engine and the scheduler,
# starts generations and logs their ends. Nothing here knows about HTTP.
class Response:
    def __init__(self, status: int = 200, body: bytes = b"", content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


class JSONResponse(Response):
    def __init__(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None):
        super().__init__(status, json.dumps(obj).encode(), "application/json", headers)


class StreamResponse(Response):
    """A body written piece by piece as `chunks` yields; the connection closes at its end."""

    def __init__(self, content_type: str, chunks: Iterator[bytes], job: Job | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(200, b"", content_type, headers)
        self.chunks = chunks
        self.job = job


def api_key_of(headers) -> str:
    """The key a request offers: `Authorization: Bearer <key>` (OpenAI's and most clients' way), else `X-Api-Key`
    (Anthropic's); "" for none. The handler checks it against the password; routes that keep things per client
    (the Responses API's stored responses) tell clients apart by it."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return (headers.get("X-Api-Key") or "").strip()


class Request:
    """What a route sees of one request: method, path, query, headers, body, whether it carried the
    password, and, from whatever carried it, who sent it and how to watch for them hanging up."""

    def __init__(self, app: App, method: str, path: str, query: dict[str, str], headers, body: bytes,
                 authorized: bool, client: str = "", watch_hangup: Callable[[Job], None] = lambda job: None,
                 style: str = "kobold"):
        self.app = app
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.authorized = authorized
        self.client = client
        self.style = style
        self._watch_hangup = watch_hangup
        self.job: Job | None = None
        self.ignored: list[str] = []      # fields named in X-KoboldLite-Ignored
        self.served: ServedModel | None = None   # the model this request uses, held until it ends
        self.keep_alive: float | None = None     # Ollama's keep_alive: how long the model stays after
        self._json: Any = None
        self._parsed = False

    def json(self, optional: bool = False) -> Any:
        """The body as JSON; an empty body is None when optional, else a 400."""
        if not self._parsed:
            self._parsed = True
            if self.body.strip():
                try:
                    self._json = json.loads(self.body)
                except (ValueError, UnicodeDecodeError) as e:
                    raise RequestError(f"the request body is not valid JSON: {e}") from None
                except RecursionError:
                    raise RequestError("the request body is nested too deeply") from None
        if self._json is None and not optional:
            raise RequestError("a JSON request body is required")
        return self._json

    @property
    def api_key(self) -> str:
        return api_key_of(self.headers)

    def entry(self, name: Any = None) -> ModelEntry:
        """The model a request names (none, or with one model any name: the default); else a 404."""
        catalog = self.app.catalog
        if not catalog.several:
            name = None
        elif name is not None and not isinstance(name, str):
            raise RequestError("'model' must be a string")
        entry = catalog.find(name)
        if entry is None:
            raise ModelNotFound(name)
        return entry

    def use(self, name: Any = None) -> ServedModel:
        """The model this request names, loaded (this may wait for a load or a swap), held until it ends."""
        if self.served is None:
            self.served = self.app.roster.acquire(self.entry(name))
        return self.served

    def ignore_fields_but(self, body: dict, *known: str):
        """A route that reads only `known` of its body: the rest is named (header and log), never dropped."""
        self.ignored = [k for k in body if k not in known]
        if self.ignored:
            self.app.log(f"{self.method} {self.path}: ignored fields: {', '.join(self.ignored)}")

    def use_loaded(self, served: ServedModel) -> ServedModel | None:
        """Hold this model if it is still loaded (never loads it); None if it is gone."""
        if self.served is None and self.app.roster.hold(served):
            self.served = served
        return self.served if self.served is served else None

    def release(self):
        """The request has ended: its answer is written (a stream to its end)."""
        if self.served is not None:
            served, self.served = self.served, None
            self.app.roster.release(served, self.keep_alive)

    def start_generation(self, request: GenerationRequest) -> Job:
        """Queue a generation for this client; it is cancelled if the client hangs up."""
        request.client = self.client
        self.job = self.use().start_generation(request)
        self.ignored = self.job.ignored_fields
        self._watch_hangup(self.job)
        return self.job


def wait_for_text(job: Job) -> str:
    """The whole text of a non-streamed request; a failed generation fails the request."""
    job.buffer.wait_done()
    if job.buffer.stop_reason is StopReason.FAILED:
        raise Failed(job.buffer.error or "generation failed")
    return job.buffer.text()
