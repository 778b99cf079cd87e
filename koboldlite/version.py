"""Version numbers: this program's, and the API versions clients gate features on."""

from __future__ import annotations


__version__ = "0.1.0"


KOBOLD_API_VERSION = "1.2.5"       # clients gate stop sequences (1.2.2) and EOS bans (1.2.4) on it


KOBOLDCPP_COMPAT_VERSION = "1.102.0"  # clients gate SSE, polling, grammar, min_p... on it
