"""Start-up errors: one clear line on stderr and exit status 2, before any model loads; and the options as README's
table documents them."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from koboldlite.config import Config, build_arg_parser
from tests.harness import ROOT, SCRIPT


def run(*args, timeout=60):
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("koboldlite: error: ")
    return lines[0]


def test_missing_model(tmp_path):
    code, _, err = run("--model", str(tmp_path / "nope.gguf"))
    assert code == 2 and "model file not found" in one_error_line(err)


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], "port"),
    (["--contextsize", "abc"], "contextsize"),
    (["--threads", "-3"], "threads"),
    (["--parallel", "0"], "parallel"),
    (["--bogus"], "unrecognized"),
    (["--kvperslot", "--kvsplit"], "kvsplit"),
    (["--blasbatchsize", "8"], "batchsize"),          # KoboldCpp's name; -1 is its one value below 16
])
def test_bad_values(starter_model, args, words):
    code, _, err = run("--model", starter_model, *args)
    assert code == 2 and words in one_error_line(err)


def test_unreadable_certificate(starter_model, tmp_path):
    (tmp_path / "c.pem").write_text("not a certificate")
    code, _, err = run("--model", starter_model, "--ssl", str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    assert code == 2 and "certificate" in one_error_line(err)


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"definitely not a model" * 100)
    code, _, err = run("--model", str(fake), "--port", "0")
    assert code == 2 and "not a GGUF" in err.splitlines()[-1]


def test_port_in_use(starter_model):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        code, _, err = run("--model", starter_model, "--port", str(holder.getsockname()[1]))
    finally:
        holder.close()
    assert code == 2 and "already in use" in one_error_line(err)


def test_config_file(starter_model, tmp_path):
    cfg = tmp_path / "k.json"
    cfg.write_text(json.dumps({"model": starter_model, "port": 99999}))
    code, _, err = run("--config", str(cfg))
    assert code == 2 and "port" in one_error_line(err)
    cfg.write_text(json.dumps({"model": starter_model, "colour": "blue"}))
    code, _, err = run("--config", str(cfg))
    assert code == 2 and "colour" in one_error_line(err)


def test_config_file_serves(starter_model, tmp_path):
    from tests.harness import ServerProcess
    cfg = tmp_path / "k.json"
    cfg.write_text(json.dumps({"model": starter_model, "contextsize": 512, "password": "pw"}))
    s = ServerProcess(["--config", str(cfg)])
    try:
        assert s.json("GET", "/api/extra/true_max_context_length") == {"value": 512}
        assert s.json("GET", "/api/extra/version")["protected"] is True
    finally:
        assert s.stop() == 0


def test_lan_bind_prints_urls_and_warns(starter_model):
    from tests.harness import ServerProcess
    s = ServerProcess(["--model", starter_model, "--host", "0.0.0.0"])
    try:
        text = "\n".join(s.lines)
        assert "without --password" in text
        assert f"Serving at http://127.0.0.1:{s.port}" in text
    finally:
        s.stop()


def test_starter_model_is_the_default():
    from tests.harness import ServerProcess
    s = ServerProcess([])
    try:
        assert "SmolLM2-135M-Instruct" in s.json("GET", "/api/v1/model")["result"]
    finally:
        s.stop()


def readme_option_rows() -> list[str]:
    """The rows of README's options table: each starts with the options it documents."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.startswith("| `--")]


# What README's options table calls a default where it names it other than by the value given on the command line.
DEFAULT_NAMES = {"quantkv": {0: "f16"}}


def test_readme_names_each_choice_and_the_default():
    """Every option with fixed choices has its row in README's options table, listing them as the parser does
    and marking as the default the one a server started without it uses (the row once called `short` the
    default of --cpuwait while `spin` was)."""
    rows = readme_option_rows()
    options = [a for a in build_arg_parser()._actions if a.choices]
    assert options
    for action in options:
        name = action.dest
        own = [row for row in rows if row.startswith(f"| `--{name} ")]
        assert len(own) == 1, f"--{name}: {len(own)} rows in README's options table"
        listed = own[0].split("`")[1].split(" ", 1)[1].replace("\\|", "|").split("|")
        assert listed == [str(c) for c in action.choices], own[0]
        default = getattr(Config(), name)
        shown = DEFAULT_NAMES.get(name, {}).get(default, str(default))
        marked = re.findall(r"`?([\w.]+)`? \(default\)", own[0])
        assert marked == [shown], f"--{name}: README marks {marked} as the default, the server uses {shown!r}"


def test_readme_has_a_row_for_every_option():
    """Each command-line option is in README's options table (a row may name several), where a user looks."""
    named = {option for row in readme_option_rows() for option in re.findall(r"`(--[\w-]+)", row.split("|")[1])}
    missing = [a.option_strings[0] for a in build_arg_parser()._actions
               if a.option_strings and a.dest != "help" and not named & set(a.option_strings)]
    assert not missing, f"options without a row in README's options table: {missing}"
