"""No web page may use the server behind its user's back (issue 22): the Host check against DNS rebinding,
the origin policy (CORS), the limit on password guessing, and the warnings. The browser tests load a page
from another origin on loopback in a real Chromium, which resolves the made-up name evil.test to 127.0.0.1."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import sys
import threading

import pytest

from koboldlite.errors import ConfigError
from koboldlite.config import load_config
from koboldlite.web.access import AuthThrottle
from tests.harness import SCRIPT, ServerProcess, WatchedProcess

PROMPT = {"prompt": "Say hello.", "max_length": 3}


def generations(server) -> int:
    return server.json("GET", "/api/extra/perf")["total_gens"]


def raw_request(server, method: str, path: str, headers: dict, body: bytes = b"", source: str = "127.0.0.1"):
    """One request with exactly these headers (Host included) over a real socket; (status, headers, body)."""
    if server.scheme == "https":
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=60, context=server.ssl_context(),
                                           source_address=(source, 0))
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60, source_address=(source, 0))
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# -- the Host check (DNS rebinding) ----------------------------------------------------------

def test_a_rebound_name_is_refused_before_any_work(server):
    """The issue's attack as it was tried: a simple request (text/plain, no preflight) through a rebound name."""
    before = generations(server)
    status, headers, body = raw_request(server, "POST", "/api/v1/generate", {
        "Host": "rebind.attacker.example", "Origin": "http://rebind.attacker.example",
        "Content-Type": "text/plain"}, json.dumps(PROMPT).encode())
    assert status == 403, body
    error = json.loads(body)["detail"]
    assert error["type"] == "forbidden" and "--hostname rebind.attacker.example" in error["msg"]
    assert "access-control-allow-origin" not in headers
    assert generations(server) == before
    # Also the page itself, the polling endpoint and an OpenAI route (in OpenAI's error shape).
    for method, path in (("GET", "/"), ("GET", "/api/extra/generate/check"), ("GET", "/api/extra/preloadstory")):
        assert raw_request(server, method, path, {"Host": "rebind.attacker.example"})[0] == 403, path
    status, _, body = raw_request(server, "GET", "/v1/models", {"Host": "rebind.attacker.example:5001"})
    assert status == 403 and json.loads(body)["error"]["type"] == "forbidden"


@pytest.mark.parametrize("host", [
    "127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LOCALHOST", "localhost.", "chat.localhost:{port}",
    "[::1]:{port}", "[::1]", "192.168.1.20:5001", "10.0.0.7", "[fe80::1]:80", "[2001:db8::5]", "{hostname}",
    "{hostname}:{port}"])
def test_local_names_and_ip_literals_pass(server, host):
    host = host.format(port=server.port, hostname=socket.gethostname())
    status, _, body = raw_request(server, "GET", "/api/v1/model", {"Host": host})
    assert status == 200, (host, body)


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example:80", "127.0.0.1.nip.io", "x",
                                  "[::1", "a:b:c", "[::1]x", "host:port"])
def test_other_names_are_refused(server, host):
    assert raw_request(server, "GET", "/api/v1/model", {"Host": host})[0] == 403, host


def test_no_host_header_is_not_a_browser(server):
    """HTTP/1.0 clients and health checkers send none; a browser always does."""
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        with server.ssl_context().wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"GET /api/v1/model HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_hostname_option_admits_a_name(make_server, tmp_path, starter_model):
    s = make_server("--hostname", "llm.home.arpa", "--hostname", "Box.Lan")
    assert raw_request(s, "GET", "/api/v1/model", {"Host": "llm.home.arpa:5001"})[0] == 200
    assert raw_request(s, "GET", "/api/v1/model", {"Host": "box.lan"})[0] == 200
    assert raw_request(s, "GET", "/api/v1/model", {"Host": "other.home.arpa"})[0] == 403
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": starter_model, "hostname": ["a.example", "b.example"],
                                  "cors_origin": "https://ui.example"}))
    cfg = load_config(["--config", str(config), "--hostname", "c.example"])
    assert cfg.hostname == ["c.example"] and cfg.cors_origin == ["https://ui.example"]
    assert load_config(["--config", str(config)]).hostname == ["a.example", "b.example"]
    for bad in (["--hostname", "not a name"], ["--cors-origin", "ui.example"], ["--cors-origin", "null"]):
        with pytest.raises(ConfigError):
            load_config(["--model", starter_model, *bad])


def test_ipv6_loopback_server(starter_model):
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    s = WatchedProcess([sys.executable, SCRIPT, "--model", starter_model, "--contextsize", "512", "--host", "::1",
                        "--port", "0"])
    try:
        port = int(s.wait_for_line(r"^Serving at http://\[::1\]:(\d+)", 120).group(1))
        exchange_on_v6(port)
    finally:
        s.stop()


def exchange_on_v6(port: int):
    with socket.create_connection(("::1", port)) as sock:
        for host, expect in ((f"[::1]:{port}", b"200"), (f"localhost:{port}", b"200"),
                             ("rebind.attacker.example", b"403")):
            sock.sendall(f"GET /api/v1/model HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = b""
            while len(body) < length:
                body += sock.recv(length - len(body))
            assert head.split(b" ")[1] == expect, (host, head)


# -- the origin policy -------------------------------------------------------------------------

def origin_request(server, method: str, path: str, origin: str | None, body: dict | None = None,
                   headers: dict | None = None):
    hdrs = {"Host": f"127.0.0.1:{server.port}", "Content-Type": "application/json", **(headers or {})}
    if origin is not None:
        hdrs["Origin"] = origin
    return raw_request(server, method, path, hdrs, json.dumps(body).encode() if body is not None else b"")


@pytest.mark.parametrize("origin", ["http://localhost:3000", "https://localhost", "http://127.0.0.1:8000",
                                    "http://[::1]:9000", "https://lite.koboldai.net", "own"])
def test_allowed_origins_get_their_own_origin_back(server, origin):
    if origin == "own":
        origin = f"https://127.0.0.1:{server.port}"
    status, headers, body = origin_request(server, "POST", "/api/v1/generate", origin, PROMPT)
    assert status == 200, body
    assert headers["access-control-allow-origin"] == origin and headers["vary"] == "Origin"
    assert "X-KoboldLite-Ignored" in headers["access-control-expose-headers"]
    status, headers, _ = origin_request(server, "OPTIONS", "/api/v1/generate", origin, headers={
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization",
        "Access-Control-Request-Private-Network": "true"})
    assert 200 <= status < 300
    assert headers["access-control-allow-origin"] == origin
    assert headers["access-control-allow-private-network"] == "true"
    assert {"authorization", "content-type", "genkey"} <= {
        h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    status, headers, _ = origin_request(server, "OPTIONS", "/v1/responses", origin, headers={
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-stainless-os, bad header!"})
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert "x-stainless-os" in allowed and not any("bad" in h for h in allowed)   # what an SDK in a page adds
    assert "POST" in headers["access-control-allow-methods"]


@pytest.mark.parametrize("origin", ["http://evil.example", "https://lite.koboldai.net.evil.example", "null",
                                    "http://localhost.evil.example", "http://127.0.0.2:8000"])
def test_other_origins_are_refused_before_any_work(server, origin):
    before = generations(server)
    for content_type in ("text/plain", "application/json"):
        status, headers, body = origin_request(server, "POST", "/api/v1/generate", origin, PROMPT,
                                               {"Content-Type": content_type})
        assert status == 403, body
        assert "access-control-allow-origin" not in headers
        assert "--cors-origin" in json.loads(body)["detail"]["msg"]
    status, headers, _ = origin_request(server, "OPTIONS", "/api/v1/generate", origin,
                                        headers={"Access-Control-Request-Method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in headers
    status, _, body = origin_request(server, "POST", "/v1/chat/completions", origin,
                                     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 403 and json.loads(body)["error"]["type"] == "forbidden"
    assert origin_request(server, "GET", "/api/tags", origin)[0] == 403
    assert generations(server) == before


def test_programs_without_origin_get_no_cors_headers(server):
    status, headers, _ = origin_request(server, "GET", "/api/v1/model", None)
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_origin_option_and_star(make_server):
    s = make_server("--cors-origin", "https://ui.example:8443")
    status, headers, _ = origin_request(s, "GET", "/api/v1/model", "https://ui.example:8443")
    assert status == 200 and headers["access-control-allow-origin"] == "https://ui.example:8443"
    assert origin_request(s, "GET", "/api/v1/model", "https://ui.example")[0] == 403   # another port
    star = make_server("--cors-origin", "*")
    for origin in ("http://evil.example", None):
        status, headers, _ = origin_request(star, "POST", "/api/extra/tokencount", origin, {"prompt": "x"})
        assert status == 200 and headers["access-control-allow-origin"] == "*"
    status, headers, _ = origin_request(star, "OPTIONS", "/api/v1/generate", "http://evil.example",
                                        headers={"Access-Control-Request-Method": "POST"})
    assert 200 <= status < 300 and headers["access-control-allow-origin"] == "*"


def test_with_a_password_the_password_is_the_gate(make_server):
    s = make_server("--password", "open sesame")
    key = {"Authorization": "Bearer open sesame"}
    evil = "http://evil.example"
    status, headers, _ = origin_request(s, "OPTIONS", "/api/v1/generate", evil,
                                        headers={"Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "authorization,content-type"})
    assert 200 <= status < 300 and headers["access-control-allow-origin"] == evil
    status, headers, body = origin_request(s, "POST", "/api/v1/generate", evil, PROMPT, key)
    assert status == 200 and headers["access-control-allow-origin"] == evil, body
    status, headers, body = origin_request(s, "POST", "/api/v1/generate", evil, PROMPT)
    assert status == 401 and "access-control-allow-origin" not in headers
    assert origin_request(s, "GET", "/api/extra/version", evil)[0] == 403      # nothing for a page without it
    assert origin_request(s, "GET", "/api/extra/version", "http://localhost:3000")[0] == 200


# -- password guessing ----------------------------------------------------------------------------

def test_wrong_passwords_are_limited_per_address(make_server):
    s = make_server("--password", "correct horse")
    mark = s.mark()
    wrong = [f"guess-{i}-xyzzy" for i in range(11)]
    answers = [origin_request(s, "POST", "/api/extra/tokencount", None, {"prompt": "x"},
                              {"Authorization": f"Bearer {w}"}) for w in wrong]
    assert [a[0] for a in answers[:10]] == [401] * 10
    status, headers, body = answers[10]
    assert status == 429, body
    assert 1 <= int(headers["retry-after"]) <= 60
    # Locked out whatever it offers, the right password included, and on the routes that only read the key.
    assert origin_request(s, "POST", "/api/extra/tokencount", None, {"prompt": "x"},
                          {"X-Api-Key": "correct horse"})[0] == 429
    assert origin_request(s, "GET", "/api/v1/model", None, headers={"Authorization": "Bearer x"})[0] == 429
    # Another address with the right password is served at once.
    status, _, body = raw_request(s, "POST", "/api/extra/tokencount",
                                  {"Host": f"127.0.0.1:{s.port}", "Content-Type": "application/json",
                                   "Authorization": "Bearer correct horse"}, b'{"prompt": "x"}', source="127.0.0.2")
    assert status == 200, body
    # Open endpoints still answer the locked address (they need no password).
    assert origin_request(s, "GET", "/api/extra/version", None)[0] == 200
    s.wait_for_line(r"password: 10 wrong passwords from 127\.0\.0\.1 within 60s", start=mark)
    s.stop()
    log = "\n".join(s.lines)
    assert not any(w in log for w in wrong) and "correct horse" not in log
    assert not any(w.encode() in a[2] for w in wrong for a in answers)


def test_throttle_window_unit():
    lines = []
    throttle = AuthThrottle(lines.append)
    for _ in range(throttle.LIMIT - 1):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    throttle.failed("10.0.0.1")
    assert 59 <= throttle.retry_after("10.0.0.1") <= 60
    assert throttle.retry_after("10.0.0.2") == 0
    # The window slides: failures older than a minute no longer count.
    with throttle._lock:
        times = throttle._failures["10.0.0.1"]
        for i in range(len(times)):
            times[i] -= throttle.WINDOW + 1
    assert throttle.retry_after("10.0.0.1") == 0 and "10.0.0.1" not in throttle._failures
    assert len(lines) == throttle.LIMIT and "refusing" in lines[-1]


# -- the warnings ----------------------------------------------------------------------------------

def test_a_password_over_plain_http_on_the_network_is_warned_about(starter_model, tls_files):
    plain = ServerProcess(["--model", starter_model, "--contextsize", "512", "--host", "0.0.0.0",
                           "--password", "pw"])
    try:
        assert any("password crosses the network in clear text" in line and "--ssl" in line
                   for line in plain.lines)
    finally:
        plain.stop()
    tls = ServerProcess(["--model", starter_model, "--contextsize", "512", "--host", "0.0.0.0",
                         "--password", "pw", "--ssl", *tls_files], cert=tls_files[0])
    try:
        assert not any("clear text" in line for line in tls.lines)
    finally:
        tls.stop()


# -- in a real browser ---------------------------------------------------------------------------------

PAGE = """<!doctype html><meta charset="utf-8"><title>a page from elsewhere</title><p>Nothing to see.</p>"""

# Run in the page: a generation as fetch() sends it, and whether the page could read the answer.
TRY_GENERATE = """async ([url, contentType]) => {
  try {
    const r = await fetch(url, {method: "POST", headers: {"Content-Type": contentType},
                                body: JSON.stringify({prompt: "Say hello.", max_length: 3})});
    return {read: true, status: r.status, text: await r.text()};
  } catch (e) { return {read: false, error: String(e)}; }
}"""
# no-cors: the page cannot read the answer, but the request is sent.
BLIND = """async (url) => {
  try { await fetch(url, {method: "POST", mode: "no-cors", body: JSON.stringify({prompt: "Hi", max_length: 3})});
        return "sent"; } catch (e) { return String(e); }
}"""


class PageServer:
    """A static page on a loopback port of its own: another origin, as any web site is."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = PAGE.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def page_server():
    p = PageServer()
    yield p
    p.close()


@pytest.fixture(scope="module")
def rebinding_browser():
    """Chromium that resolves evil.test to this machine, as a rebound (or any attacker's local) name would."""
    from tests.test_ui import chromium
    with chromium("--host-resolver-rules=MAP evil.test 127.0.0.1") as b:
        yield b


@pytest.fixture
def browser_page(rebinding_browser):
    context = rebinding_browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def test_browser_page_from_another_origin_cannot_generate(browser_page, page_server, make_server):
    s = make_server(tls=False)
    browser_page.goto(f"http://evil.test:{page_server.port}/")
    api = f"http://127.0.0.1:{s.port}/api/v1/generate"
    for content_type in ("text/plain", "application/json"):       # without and with a preflight
        result = browser_page.evaluate(TRY_GENERATE, [api, content_type])
        assert result["read"] is False, result
    assert browser_page.evaluate(BLIND, api) == "sent"
    assert generations(s) == 0
    # DNS rebinding: the attacker's name now points at the server, so the page is "same-origin" with it.
    response = browser_page.goto(f"http://evil.test:{s.port}/")
    assert response.status == 403
    result = browser_page.evaluate(TRY_GENERATE, ["/api/v1/generate", "application/json"])
    assert result["read"] and result["status"] == 403 and "--hostname" in result["text"]
    assert generations(s) == 0


def test_browser_page_at_an_allowed_origin_can_generate(browser_page, page_server, make_server):
    s = make_server("--cors-origin", f"http://evil.test:{page_server.port}", tls=False)
    api = f"http://127.0.0.1:{s.port}/api/v1/generate"
    for page_url in (f"http://evil.test:{page_server.port}/", f"http://localhost:{page_server.port}/"):
        browser_page.goto(page_url)
        for content_type in ("text/plain", "application/json"):
            result = browser_page.evaluate(TRY_GENERATE, [api, content_type])
            assert result["read"] and result["status"] == 200, (page_url, result)
            assert isinstance(json.loads(result["text"])["results"][0]["text"], str)
    assert generations(s) == 4
