"""The test harness, shared by the tests (through conftest.py) and the benchmarks: the program under test started
as a real server on free loopback ports, real sockets and real TLS, and clients for it.

Which program: KOBOLDLITE_SCRIPT names it (a path); without it, the tests build the one file that ships,
dist/koboldlite.py (conftest.py runs tools/build_single.py), and the benchmarks start the launcher over the package,
koboldlite.py. In-process tests import the package's modules by their names (`from koboldlite.engine.kv_pool import
KVPool`): when the program under test is the joined file, `use_program` mounts it under every one of those names, so
they test the code that ships.
"""

from __future__ import annotations

import datetime
import http.client
import importlib.util
import ipaddress
import json
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LAUNCHER = os.path.join(ROOT, "koboldlite.py")                 # the launcher over the koboldlite package
SINGLE_FILE = os.path.join(ROOT, "dist", "koboldlite.py")      # what tools/build_single.py writes
SCRIPT = os.path.abspath(os.environ.get("KOBOLDLITE_SCRIPT") or LAUNCHER)
PIP_LLAMA_LIB = os.path.join(os.path.dirname(importlib.util.find_spec("llama_cpp").origin), "lib")
STARTUP_TIMEOUT = 120


def build_single_file(out: str = SINGLE_FILE) -> str:
    """The one file that ships, built from the package now (the build's own checks fail loudly)."""
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_single.py"), "--out", out], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def load_builder():
    """tools/build_single.py as a module (its checks and its join)."""
    spec = importlib.util.spec_from_file_location("build_single", os.path.join(ROOT, "tools", "build_single.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_joined_file(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        return "\nJOINED_MODULES = " in f.read()


def use_program(path: str) -> str:
    """Make `path` the program every ServerProcess starts; a joined file is also mounted under the package's module
    names for in-process tests (before anything imports the package)."""
    global SCRIPT
    SCRIPT = os.path.abspath(path)
    if is_joined_file(SCRIPT):
        if any(name == "koboldlite" or name.startswith("koboldlite.") for name in sys.modules):
            raise RuntimeError("the koboldlite package was imported before the joined file could be mounted")
        spec = importlib.util.spec_from_file_location("koboldlite", SCRIPT)
        joined = importlib.util.module_from_spec(spec)
        sys.modules["koboldlite"] = joined
        spec.loader.exec_module(joined)
        for name in joined.JOINED_MODULES:
            sys.modules[name] = joined
    return SCRIPT


def program_command(script: str | None = None) -> list[str]:
    """The command that starts the program under test (or `script`)."""
    return [sys.executable, script or SCRIPT]


def copy_of_program(folder: str) -> str:
    """The program under test placed in `folder` as a user would place it, for tests of what it finds beside itself:
    the joined file copied alone; the launcher with a link to the package. Returns the script's path there."""
    import shutil
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "koboldlite.py")
    shutil.copy(SCRIPT, target)
    if not is_joined_file(SCRIPT):
        os.symlink(os.path.join(os.path.dirname(SCRIPT), "koboldlite"), os.path.join(folder, "koboldlite"))
    return target


def make_self_signed_cert(directory: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class WatchedProcess:
    """A subprocess whose output lines can be waited for."""

    def __init__(self, command: list[str], env: dict | None = None, cwd: str | None = None):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, cwd=cwd)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<EOF>")
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 30, start: int = 0) -> re.Match:
        """Wait until an output line (from index `start`) matches; fail on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        return m
                    if self.lines[i - 1] == "<EOF>":
                        raise AssertionError(f"process exited before printing {pattern!r}:\n" +
                                             "\n".join(self.lines[-30:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" +
                                         "\n".join(self.lines[-30:]))
                self._cond.wait(left)

    def wait_for_lines(self, pattern: str, count: int, timeout: float = 30) -> list[str]:
        """Wait until `count` output lines match (the log is written by a thread of its own, after the reply)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if rx.search(line)]
                if len(found) >= count or "<EOF>" in self.lines[-1:]:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return found
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


class HTTPClient:
    """Requests to a server at scheme://127.0.0.1:port, trusting `cert` for https."""

    scheme = "http"
    port = 0
    cert: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.cert) if self.scheme == "https" else None

    def connection(self, timeout: float = 60, source: str | None = None) -> http.client.HTTPConnection:
        """`source`: another loopback address to connect from (the server tells clients apart by address)."""
        where = {"source_address": (source, 0)} if source else {}
        if self.scheme == "https":
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.ssl_context(),
                                               **where)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, **where)

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                timeout: float = 120, source: str | None = None) -> tuple[int, dict, bytes]:
        conn = self.connection(timeout, source)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, headers: dict | None = None, expect: int = 200):
        status, _, data = self.request(method, path, body, headers)
        assert status == expect, (status, data)
        return json.loads(data)

    def raw_socket(self, timeout: float = 60) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.scheme == "https":
            sock = self.ssl_context().wrap_socket(sock, server_hostname="localhost")
        return sock


class ServerProcess(WatchedProcess, HTTPClient):
    """koboldlite.py in a subprocess, ready once it prints the URL it serves."""

    def __init__(self, args: list[str], cert: str | None = None, env: dict | None = None,
                 command: list[str] | None = None, cwd: str | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT):
        """`command` replaces `python <the program under test> --port 0` (the executable, say)."""
        self.cert = cert
        if command is None:
            # The script runs on pip's llama-cpp-python build unless a test names another: a GPU build made
            # beside it (tools/build_llama_lib.sh) would otherwise be found and used (tests/test_gpu.py).
            env = {"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB, **(env or {})}
            command = [*program_command(), "--port", "0"]
        super().__init__([*command, *args], env=env, cwd=cwd)
        m = self.wait_for_line(r"^Serving at (https?)://127\.0\.0\.1:(\d+)", startup_timeout)
        self.ready_line = m.string
        self.scheme, self.port = m.group(1), int(m.group(2))
        self.base = f"{self.scheme}://127.0.0.1:{self.port}"


class SSEStream:
    """An open SSE response, read event by event off the socket."""

    def __init__(self, server: ServerProcess, path: str, body: dict, headers: dict | None = None):
        self.conn = server.connection()
        self.conn.request("POST", path, body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json", **(headers or {})})
        self.sock = self.conn.sock      # http.client lets go of it once the response will close
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.raw = b""

    def next_event(self) -> bytes | None:
        """The bytes of one event including its blank line, or None at the end of the stream. Comment blocks
        (`: ping`, which keeps a stream alive while a long prompt is read) are skipped, as SSE clients skip them;
        `raw` keeps every byte."""
        event = b""
        while True:
            line = self.resp.readline()
            if not line:
                return None if not event else event
            self.raw += line
            if line.startswith(b":") and not event:
                continue
            event += line
            if line in (b"\n", b"\r\n"):
                if event.strip():
                    return event
                event = b""

    def events(self):
        while (e := self.next_event()) is not None:
            yield e

    def close(self):
        """Hang up abruptly, as a closed browser tab does."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.resp.close()
        self.sock.close()


KOBOLD_EVENT = re.compile(rb"^event: (.*)\ndata: (.*)(\r?\n){2}$")


def kobold_event_json(event: bytes) -> dict:
    m = KOBOLD_EVENT.match(event)
    assert m, f"not a KoboldCpp SSE event: {event!r}"
    assert m.group(1) == b"message"
    return json.loads(m.group(2))


def openai_client_for(server: HTTPClient, api_key: str = "sk-dummy"):
    """The official openai client, trusting the test certificate; the key is a dummy, as many apps send.
    (Its HTTP library is httpx, or httpx2 in the newest releases.)"""
    import openai
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return openai.OpenAI(base_url=f"{server.scheme}://127.0.0.1:{server.port}/v1", api_key=api_key,
                         http_client=httpx.Client(verify=server.ssl_context() or True))


def in_thread(fn, *args, **kwargs) -> "queue.Queue":
    """Run fn in a thread; the queue receives its result (or exception) when it ends."""
    q: queue.Queue = queue.Queue()

    def run():
        try:
            q.put(fn(*args, **kwargs))
        except BaseException as e:  # handed to the test to raise
            q.put(e)
    threading.Thread(target=run, daemon=True).start()
    return q


def result_of(q: "queue.Queue", timeout: float = 120):
    r = q.get(timeout=timeout)
    if isinstance(r, BaseException):
        raise r
    return r
