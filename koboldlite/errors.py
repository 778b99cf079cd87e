"""The errors every layer raises: a bad configuration, a model that cannot load, bad client input."""

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
