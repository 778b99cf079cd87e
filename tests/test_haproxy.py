"""Three instances behind a real HAProxy with deploy/haproxy/haproxy.cfg (issue 8).

The committed configuration is used as it is, but for its listening port, the
instances' ports and the path of its error pages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time

import pytest

from tests.harness import ROOT, SCRIPT, HTTPClient, ServerProcess, SSEStream, WatchedProcess, in_thread, \
    kobold_event_json, result_of

CONFIG = os.path.join(ROOT, "deploy", "haproxy", "haproxy.cfg")
NAMES = ["a", "b", "c"]
LONG = {"max_length": 1500, "ban_eos_token": True}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Balancer(HTTPClient):
    def __init__(self, port: int):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"


class Cluster:
    def __init__(self, model: str, workdir):
        *instance_ports, front = free_ports(4)
        self.ports = dict(zip(NAMES, instance_ports))
        text = open(CONFIG).read()
        text = text.replace("bind :5001", f"bind 127.0.0.1:{front}")
        text = text.replace("/etc/haproxy/errors/", os.path.join(ROOT, "deploy", "haproxy", "errors") + "/")
        for name, default in zip(NAMES, (5101, 5102, 5103)):
            text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{self.ports[name]}")
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(text)
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        assert os.path.exists(haproxy), "HAProxy is missing: run tests/install.sh"
        # HAProxy first: it reports each instance DOWN, then UP once the instance has loaded its model.
        self.haproxy = WatchedProcess([haproxy, "-db", "-f", str(cfg)])
        for name in NAMES:
            self.haproxy.wait_for_line(rf"Server least_busy/{name} is DOWN")
        self.instances = {
            name: ServerProcess(["--port", str(port), "--instance-id", name, "--threads", "1", "--parallel", "6",
                                 "--contextsize", "1024", "--multiuser", "32", "--model", model],
                                command=[sys.executable, SCRIPT])
            for name, port in self.ports.items()}
        for backend in ("by_genkey", "least_busy"):
            for name in NAMES:
                self.haproxy.wait_for_line(rf"Server {backend}/{name} is UP", timeout=60)
        self.balancer = Balancer(front)

    def stop(self):
        for s in self.instances.values():
            s.stop()
        self.haproxy.stop()


@pytest.fixture(scope="module")
def cluster(starter_model, tmp_path_factory):
    c = Cluster(starter_model, tmp_path_factory.mktemp("haproxy"))
    yield c
    c.stop()


def instance_of(headers: dict) -> str:
    return headers["x-koboldlite-instance"]


def test_polled_generations_keep_to_their_instance(cluster):
    lb = cluster.balancer

    def polled(i: int):
        key = f"LB-poll-{i}"
        pending = in_thread(lb.request, "POST", "/api/v1/generate",
                            {"prompt": f"Poll {i}:", "max_length": 40, "ban_eos_token": True, "genkey": key})
        checks = []
        while pending.empty():      # KoboldAI Lite's polling, through the balancer
            status, headers, body = lb.request("POST", "/api/extra/generate/check", {"genkey": key})
            checks.append((instance_of(headers), json.loads(body)["results"][0]["text"]))
        status, headers, body = result_of(pending)
        assert status == 200
        return key, instance_of(headers), json.loads(body)["results"][0]["text"], checks

    results = [result_of(q) for q in [in_thread(polled, i) for i in range(12)]]
    used = set()
    for key, where, text, checks in results:
        used.add(where)
        assert text
        assert all(instance == where for instance, _ in checks), (key, where, checks)
        assert all(text.startswith(seen) for _, seen in checks)            # always its own text
        assert any(seen for _, seen in checks), "no check saw the text growing"
        # The header variant of the genkey routes the same way as the body.
        status, headers, body = lb.request("GET", "/api/extra/generate/check", headers={"genkey": key})
        assert instance_of(headers) == where and json.loads(body)["results"][0]["text"] == text
    assert len(used) >= 2, used


def test_abort_through_the_balancer_stops_the_right_generation(cluster):
    lb = cluster.balancer
    streams = {}
    for i in range(6):
        key = f"LB-abort-{i}"
        s = SSEStream(lb, "/api/extra/generate/stream", {"prompt": f"Story {i}:", "genkey": key, **LONG})
        kobold_event_json(s.next_event())
        streams[key] = s
    stopped = [f"LB-abort-{i}" for i in (0, 2, 4)]
    for key in stopped:
        assert lb.json("POST", "/api/extra/abort", {"genkey": key})["success"] == "true"
    for key in stopped:
        events = [kobold_event_json(e) for e in streams[key].events()]
        assert events[-1]["finish_reason"] == "stop" and len(events) < 1000
    for key, s in streams.items():
        if key not in stopped:                   # still running: its own check grows
            kobold_event_json(s.next_event())
            assert lb.json("POST", "/api/extra/generate/check", {"genkey": key})["results"][0]["text"]
            assert lb.json("POST", "/api/extra/abort", {"genkey": key})["success"] == "true"
            assert [kobold_event_json(e) for e in s.events()][-1]["finish_reason"] == "stop"


def first_token_seconds(client, path: str, body: dict) -> float:
    t0 = time.monotonic()
    s = SSEStream(client, path, body)
    s.next_event()
    elapsed = time.monotonic() - t0
    s.close()
    return elapsed


def test_streams_flow_through_unbuffered(cluster):
    lb = cluster.balancer
    # Kobold SSE with a genkey: the first event arrives while generation runs, so an abort still finds it.
    s = SSEStream(lb, "/api/extra/generate/stream", {"prompt": "Flow:", "genkey": "LB-flow", **LONG})
    assert s.headers["content-type"] == "text/event-stream"
    kobold_event_json(s.next_event())
    assert lb.json("POST", "/api/extra/abort", {"genkey": "LB-flow"})["success"] == "true"
    assert len(list(s.events())) < 1000
    # OpenAI stream without a genkey: the least busy instance, streamed chunk by chunk to [DONE].
    s = SSEStream(lb, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                               "max_tokens": 12, "stream": True})
    events = list(s.events())
    assert events[-1] == b"data: [DONE]\n\n" and len(events) > 5
    # Time to first token, direct and through the balancer (figures for the README, not a timing assertion).
    direct = cluster.instances["a"]
    body = {"prompt": "Hello", "max_length": 4}
    ttft = {"direct": sorted(first_token_seconds(direct, "/api/extra/generate/stream", body) for _ in range(5)),
            "balancer": sorted(first_token_seconds(lb, "/api/extra/generate/stream", body) for _ in range(5))}
    os.makedirs(os.path.join(ROOT, "tests", "artifacts"), exist_ok=True)
    with open(os.path.join(ROOT, "tests", "artifacts", "haproxy-ttft.json"), "w") as f:
        json.dump({k: [round(x * 1000, 1) for x in v] for k, v in ttft.items()}, f)


def test_unkeyed_requests_spread_over_instances(cluster):
    seen = set()
    pending = [in_thread(cluster.balancer.request, "POST", "/v1/completions",
                         {"prompt": f"Spread {i}", "max_tokens": 30}) for i in range(6)]
    for q in pending:
        status, headers, _ = result_of(q)
        assert status == 200
        seen.add(instance_of(headers))
    assert len(seen) >= 2, seen


def test_a_killed_instance_leaves_rotation_and_the_others_keep_serving(cluster):
    """Last in this module: it kills an instance of the shared cluster."""
    lb = cluster.balancer
    streams, where = {}, {}
    for i in range(12):                  # long streams until every instance runs at least one
        key = f"LB-kill-{i}"
        s = SSEStream(lb, "/api/extra/generate/stream", {"prompt": f"Long {i}:", "genkey": key, **LONG})
        kobold_event_json(s.next_event())
        streams[key], where[key] = s, instance_of(s.headers)
        if set(where.values()) == set(NAMES):
            break
    assert set(where.values()) == set(NAMES)
    victim = "b"
    mark = cluster.haproxy.mark()
    cluster.instances[victim].proc.send_signal(signal.SIGKILL)
    cluster.instances[victim].proc.wait(30)
    for key, s in streams.items():
        if where[key] == victim:
            tail = list(s.events())          # ends promptly, cut short: no hang, no foreign text
            assert all(kobold_event_json(e)["finish_reason"] is None for e in tail)
        else:
            kobold_event_json(s.next_event())  # the others keep streaming
    cluster.haproxy.wait_for_line(rf"Server by_genkey/{victim} is DOWN", start=mark)
    cluster.haproxy.wait_for_line(rf"Server least_busy/{victim} is DOWN", start=mark)
    served = set()
    for i in range(12):
        status, headers, body = lb.request("POST", "/api/v1/generate",
                                           {"prompt": f"After {i}", "max_length": 3, "genkey": f"LB-after-{i}"})
        assert status == 200, body
        served.add(instance_of(headers))
        status, headers, _ = lb.request("POST", "/v1/completions", {"prompt": f"After {i}", "max_tokens": 2})
        assert status == 200
        served.add(instance_of(headers))
    assert victim not in served and served == set(NAMES) - {victim}
    for key, s in streams.items():
        if where[key] != victim:
            assert lb.json("POST", "/api/extra/abort", {"genkey": key})["success"] == "true"
            s.close()


def test_the_deploy_config_is_valid():
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    text = open(CONFIG).read().replace("/etc/haproxy/errors/",
                                       os.path.join(ROOT, "deploy", "haproxy", "errors") + "/")
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
        f.write(text)
    p = subprocess.run([haproxy, "-c", "-f", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("koboldlite-502.http", "koboldlite-503.http"):
        raw = open(os.path.join(ROOT, "deploy", "haproxy", "errors", name), "rb").read()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head
        json.loads(body)
