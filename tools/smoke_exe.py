#!/usr/bin/env python3
"""Smoke-test a built executable on any platform: start it on a free port, wait for its
"Serving at" line, check the version, generate and stream a short text, stop it. It prints the CPU variant
llama.cpp loaded (and fails if start-up named none).

    python3 tools/smoke_exe.py dist/koboldlite[.exe] [--full-offload]

With --full-offload (a GPU executable), the start-up must report every layer offloaded to the GPU.
"""

import json
import re
import subprocess
import sys
import urllib.request


def post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()


def main(exe: str, full_offload: bool = False) -> int:
    args = [exe, "--port", "0"] + (["--gpulayers", "-1"] if full_offload else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    offloaded = cpu = None
    try:
        for line in proc.stdout:          # the server prints this line once it is ready
            print(line, end="")
            c = re.match(r"CPU backend: (\S+)", line)
            if c:
                cpu = c.group(1)
            o = re.match(r"GPU: offloaded (\d+)/(\d+) layers", line)
            if o:
                offloaded = (int(o.group(1)), int(o.group(2)))
            m = re.match(r"Serving at (http://127\.0\.0\.1:\d+)", line)
            if m:
                base = m.group(1)
                break
        else:
            print("the executable exited before serving")
            return 1
        if cpu is None:
            print("start-up named no CPU backend")
            return 1
        if full_offload and not (offloaded and offloaded[0] == offloaded[1] > 0):
            print(f"not every layer was offloaded to the GPU: {offloaded}")
            return 1
        with urllib.request.urlopen(base + "/api/extra/version", timeout=60) as r:
            assert json.load(r)["result"] == "KoboldCpp"
        n = 4 if full_offload else 8        # a software GPU (lavapipe) is slow: a few tokens say enough
        text = json.loads(post(base + "/api/v1/generate", {"prompt": "Hello", "max_length": n}))["results"][0]["text"]
        assert text, "no text generated"
        stream = post(base + "/api/extra/generate/stream", {"prompt": "Hello", "max_length": n}).decode()
        assert stream.count("event: message") > 2 and '"finish_reason": "length"' in stream
        print(f"smoke test passed: generated {text!r} on CPU backend {cpu}"
              + (f", {offloaded[0]}/{offloaded[1]} layers on the GPU" if full_offload else ""))
        return 0
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], "--full-offload" in sys.argv[2:]))
