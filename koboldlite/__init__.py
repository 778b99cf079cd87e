"""KoboldLite: a local LLM server for GGUF models, as a package of modules (being split out of monolith.py).

For the time of the split the package's names are its modules' names, as koboldlite.py's were.
"""

from . import monolith as _monolith

globals().update({name: value for name, value in vars(_monolith).items() if not name.startswith("__")})
