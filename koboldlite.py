#!/usr/bin/env python3
"""KoboldLite: a local LLM server for GGUF models. This is the command users type:

    python3 koboldlite.py --model model.gguf [--ssl cert.pem key.pem] ...

The code is the koboldlite package beside this file (its __init__.py says how it is layered);
`python3 tools/build_single.py` joins it into the one file that ships, dist/koboldlite.py.
"""

import sys

from koboldlite.main import main

if __name__ == "__main__":
    sys.exit(main())
