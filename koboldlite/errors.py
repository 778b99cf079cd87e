"""The errors every layer raises.

Configuration and model files: ConfigError and ModelLoadError, one line at start-up. Bad client input, found where
a request is read: RequestError, which carries its HTTP status (4xx). What the engine, the scheduler and the roster
cannot do: ServiceError's kinds, in their own words and without HTTP; api/common.py gives each kind its status in
each API's shape.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A bad command line or config file: reported as one line, exit status 2."""


class ModelLoadError(Exception):
    """A model file llama.cpp cannot load (missing, damaged, unsupported) or a context it cannot make."""


class RequestError(Exception):
    """Bad client input: becomes a 4xx JSON answer."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None, extra: dict | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.code = code            # OpenAI's error code string, where OpenAI has one
        self.extra = extra or {}    # more fields for the error object (llama-server's numbers)
        self.headers = headers or {}   # e.g. Retry-After


class ServiceError(Exception):
    """What the service could not do; each kind below says why."""


class Invalid(ServiceError):
    """What was asked cannot be done with what it named (a grammar llama.cpp cannot parse, a slot holding nothing)."""


class ContextOverflow(Invalid):
    """A prompt that leaves no room for a reply in the context."""

    def __init__(self, n_prompt: int, n_ctx: int):
        super().__init__(f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens): "
                         f"shorten the prompt or start the server with a larger --contextsize")
        self.n_prompt, self.n_ctx = n_prompt, n_ctx


class NotFound(ServiceError):
    """No such thing here (a slot, a model, a stored response)."""


class ModelNotFound(NotFound):
    """A model name the catalog does not know."""

    def __init__(self, name: object):
        super().__init__(f"model '{name}' not found")
        self.name = name


class Conflict(ServiceError):
    """It is in use now (a slot generating, a model with replies running): try again when it is done."""


class Unavailable(ServiceError):
    """Not now: the server is stopping, has no room, or the generation loop did not answer."""


class QueueFull(Unavailable):
    """Every slot is busy and the queue holds as many as it may."""

    def __init__(self, message: str = "Server is busy; please try again later."):   # KoboldAI Lite's words
        super().__init__(message)


class Failed(ServiceError):
    """Something broke on the server's side (llama.cpp refused a decode or an embedding)."""


class ModelLoadFailed(Failed):
    """A model could not be loaded for a request; `cause` says why in the loader's own words."""

    def __init__(self, name: str, cause: Exception):
        super().__init__(f"could not load model {name}: {cause}")
        self.cause = cause
