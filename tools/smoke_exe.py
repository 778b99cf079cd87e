#!/usr/bin/env python3
"""Smoke-test a built executable on any platform: start it on a free port, wait for its
"Serving at" line, check the version, generate and stream a short text, stop it.

    python3 tools/smoke_exe.py dist/koboldlite[.exe]
"""

import json
import re
import subprocess
import sys
import urllib.request


def post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def main(exe: str) -> int:
    proc = subprocess.Popen([exe, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:          # the server prints this line once it is ready
            print(line, end="")
            m = re.match(r"Serving at (http://127\.0\.0\.1:\d+)", line)
            if m:
                base = m.group(1)
                break
        else:
            print("the executable exited before serving")
            return 1
        with urllib.request.urlopen(base + "/api/extra/version", timeout=60) as r:
            assert json.load(r)["result"] == "KoboldCpp"
        text = json.loads(post(base + "/api/v1/generate", {"prompt": "Hello", "max_length": 8}))["results"][0]["text"]
        assert text, "no text generated"
        stream = post(base + "/api/extra/generate/stream", {"prompt": "Hello", "max_length": 8}).decode()
        assert stream.count("event: message") > 2 and '"finish_reason": "length"' in stream
        print(f"smoke test passed: generated {text!r}")
        return 0
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
