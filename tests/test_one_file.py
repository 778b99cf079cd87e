"""The one file that ships: tools/build_single.py joins the package in its declared layers, refuses anything that
would make the joined file differ from the package, and the file copied alone serves everything, its page included."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from tests.harness import PIP_LLAMA_LIB, ROOT, ServerProcess, load_builder


build_single = load_builder()


@pytest.fixture
def source_copy(tmp_path) -> str:
    """The package and the page copied to a folder of their own, to be spoilt by a test."""
    shutil.copytree(os.path.join(ROOT, "koboldlite"), tmp_path / "koboldlite",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "embedded_ui"), tmp_path / "embedded_ui")
    return str(tmp_path)


def append(root: str, module: str, text: str):
    with open(os.path.join(root, "koboldlite", *module.split("/")), "a", encoding="utf-8") as f:
        f.write(text)


def test_the_package_joins_in_its_declared_order(source_copy, tmp_path):
    text = build_single.build(str(tmp_path / "out.py"), root=source_copy)
    banners = [line.split(":")[0][2:] for line in text.splitlines() if line.startswith("# koboldlite/")]
    layers = build_single.declared_order(build_single.Module("", os.path.join(source_copy, "koboldlite",
                                                                                 "__init__.py"), source_copy))
    assert banners == ["koboldlite/__init__.py"] + [f"koboldlite/{m.replace('.', '/')}.py" for m in layers]
    assert "\nfrom ." not in text and "\n    from ." not in text      # no import between modules is left


@pytest.mark.parametrize("module, addition, words", [
    ("text.py", "\n\ndef ui_files():\n    return {}\n", "ui_files is defined in koboldlite/text.py too"),
    ("errors.py", "\nfrom .main import main\n", "imports main, which comes after it in LAYERS"),
    ("fields.py", "\n\ndef reader():\n    return TextAssembler\n", "uses TextAssembler without defining or importing"),
    ("jobs.py", "\nfrom .errors import ConfigError as Bad\n", "renames ConfigError as Bad"),
    ("jobs.py", "\nfrom .errors import TextAssembler\n", "imports TextAssembler from errors, which does not define"),
    ("text.py", "\n\nHERE = __file__\n", "uses __file__"),
    ("text.py", "\n\njson = None\n", "json is defined here and imported"),
    ("engine/__init__.py", "\nimport os\n", "a subpackage's __init__.py may hold only a docstring"),
])
def test_the_build_refuses_what_would_make_the_file_differ(source_copy, tmp_path, module, addition, words):
    append(source_copy, module, addition)
    with pytest.raises(build_single.BuildError, match=words):
        build_single.build(str(tmp_path / "out.py"), root=source_copy)


def test_a_module_the_layers_do_not_list_is_refused(source_copy, tmp_path):
    with open(os.path.join(source_copy, "koboldlite", "extra.py"), "w") as f:
        f.write('"""Not listed."""\n')
    with pytest.raises(build_single.BuildError, match="not listed: extra"):
        build_single.build(str(tmp_path / "out.py"), root=source_copy)


def test_the_file_copied_alone_serves_its_page(tmp_path, starter_model):
    """Nothing beside it: no package, no embedded_ui/; the page is inside the file."""
    alone = tmp_path / "elsewhere" / "koboldlite.py"
    alone.parent.mkdir()
    build_single.build(str(alone))
    s = ServerProcess(["--port", "0", "--model", starter_model, "--contextsize", "256"],
                      command=[sys.executable, str(alone)], env={"LLAMA_CPP_LIB_PATH": PIP_LLAMA_LIB},
                      cwd=str(tmp_path))
    try:
        for name in ("index.html", "app.js", "app.css"):
            status, headers, body = s.request("GET", "/" + name)
            with open(os.path.join(ROOT, "embedded_ui", name), "rb") as f:
                assert status == 200 and body == f.read(), name
        assert s.json("POST", "/api/v1/generate", {"prompt": "Hi", "max_length": 3})["results"][0]["text"] is not None
    finally:
        s.stop()


def test_the_joined_file_stands_for_every_module_of_the_package(tmp_path):
    """tests/harness.py mounts the joined file under these names: every module of the package is among them."""
    modules = build_single.read_package()
    text = build_single.build(str(tmp_path / "koboldlite.py"))
    names = eval(text.split("\nJOINED_MODULES = ", 1)[1].split("\n", 1)[0])     # a tuple literal the build wrote
    assert {f"koboldlite.{m.name}" for m in modules[1:]} <= set(names)
