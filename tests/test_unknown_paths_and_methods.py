"""A path no route has (404) or a method its routes do not answer (405): the answer's shape is that of the API
its path belongs to, as the route table says (web/routes.py), and a 405 names the methods the path has (Allow)."""

from __future__ import annotations

import json

import pytest

from koboldlite.web.router import Router
from koboldlite.web.routes import build_router


@pytest.mark.parametrize("method, path, allow", [
    ("DELETE", "/api/v1/generate", "POST, OPTIONS"),
    ("GET", "/v1/chat/completions", "POST, OPTIONS"),
    ("POST", "/api/v1/model", "GET, HEAD, OPTIONS"),
    ("DELETE", "/api/extra/generate/check", "GET, HEAD, POST, OPTIONS"),
    ("PUT", "/v1/responses/resp_123", "GET, HEAD, DELETE, OPTIONS"),
    ("GET", "/api/latest/generate", "POST, OPTIONS"),
])
def test_a_405_names_the_methods_the_path_has(server, method, path, allow):
    status, headers, body = server.request(method, path, {} if method != "GET" else None)
    assert status == 405 and headers["allow"] == allow
    assert "not allowed" in body.decode()


@pytest.mark.parametrize("path, shape", [
    ("/api/v1/nothing-here", "kobold"),
    ("/nowhere", "kobold"),
    ("/api/nothing", "kobold"),          # /api/... is mostly KoboldCpp's
    ("/api/latest/nothing", "kobold"),
    ("/v1/nothing", "openai"),           # /v1/... is mostly OpenAI's
    ("/responses/a/b", "openai"),
    ("/v1/messages/nothing", "anthropic"),
    ("/messages/nothing", "anthropic"),
])
def test_a_404_answers_in_the_shape_of_the_api_its_path_belongs_to(server, path, shape):
    status, _, body = server.request("GET", path)
    error = json.loads(body)
    assert status == 404
    if shape == "kobold":
        assert error["detail"]["type"] == "not_found"
    elif shape == "openai":
        assert error["error"]["type"] == "not_found" and error["error"]["code"] == 404
    else:
        assert error["type"] == "error" and error["error"]["type"] == "not_found_error"


def test_the_route_table_is_the_one_source_of_a_paths_style():
    router = build_router()
    assert router.match("POST", "/api/generate").style == "ollama"
    assert router.style_of("/api/chat/extra") == "ollama"          # under an Ollama route
    assert router.style_of("/api/tags") == "ollama"
    assert router.style_of("/v1/messages/count_tokens/x") == "anthropic"
    assert router.style_of("/health/anything") == "openai"          # llama-server's, as the table says
    assert router.style_of("/") == "kobold"                         # no route near it
    # A table of its own: the style comes from the routes added, and the most of them where they differ.
    r = Router()
    r.add("GET", "/x/a /x/b", lambda app, req: None, style="openai")
    r.add("GET", "/x/c", lambda app, req: None, style="anthropic")
    assert r.style_of("/x/z") == "openai" and r.style_of("/x/c/z") == "anthropic" and r.style_of("/y") == "kobold"
