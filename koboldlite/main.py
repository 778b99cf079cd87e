"""Start-up and shutdown."""

from __future__ import annotations

from .monolith import main  # noqa: F401  (the package is being split; main moves here)
