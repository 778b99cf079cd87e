#!/usr/bin/env python3
"""Join the koboldlite package into the one file that ships, as SQLite ships sqlite3.c:

    python3 tools/build_single.py [--out dist/koboldlite.py]

The modules are joined in the order koboldlite/__init__.py declares (LAYERS), the imports between them removed,
their standard-library imports gathered at the top, and the built-in page (embedded_ui/) carried inside, so that
the file copied alone to a machine with the requirements serves everything, the page included.

The build fails, naming the module and line, on anything that would make the joined file behave otherwise than the
package: a module the order does not list (or lists twice), an import of a later module, a name imported from a
module that does not define it, an import renamed with `as` or of a whole module, a name two modules define (or a
definition that shadows an import), a name a module uses but neither defines nor imports (the joined file could
find another module's), `__file__` outside koboldlite/paths.py, or a subpackage's __init__.py with code in it.
"""

from __future__ import annotations

import argparse
import ast
import base64
import builtins
import os
import symtable
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "koboldlite"
UI_MODULE = "web.ui_files"        # replaced in the joined file by one that carries embedded_ui/'s files
BUILTINS = set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__builtins__", "__spec__"}


class BuildError(Exception):
    pass


class Module:
    """One module of the package, read and taken apart."""

    def __init__(self, name: str, path: str, root: str = ROOT):
        self.name = name                        # "engine.kv_pool"; "" for the package's own __init__
        self.path = path
        self.rel = os.path.relpath(path, root)
        with open(path, encoding="utf-8") as f:
            self.source = f.read()
        self.tree = ast.parse(self.source, path)
        self.docstring = ast.get_docstring(self.tree, clean=False)
        self.stdlib: list[ast.stmt] = []        # top-level imports of other packages, kept in the joined file
        self.internal: list[ast.ImportFrom] = []   # imports of the package's own modules, removed
        self.body: list[ast.stmt] = []          # everything else, in order
        for node in self.tree.body:
            if node is self.tree.body[0] and self.docstring is not None:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                self.internal.append(node)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                self.stdlib.append(node)
            elif self._type_checking_block(node):
                self.internal += node.body      # imports for annotations only: the joined file has the names
            else:
                self.body.append(node)

    def fail(self, node: ast.AST | None, message: str):
        raise BuildError(f"{self.rel}:{getattr(node, 'lineno', 1)}: {message}")

    def _type_checking_block(self, node: ast.stmt) -> bool:
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            return False
        if node.orelse or not all(isinstance(n, ast.ImportFrom) and n.level > 0 for n in node.body):
            self.fail(node, "an `if TYPE_CHECKING:` block may hold only imports of the package's own modules")
        return True

    def target(self, node: ast.ImportFrom) -> str:
        """The package module a relative import names."""
        parts = self.name.split(".") if self.name else []
        if os.path.basename(self.path) != "__init__.py":
            parts = parts[:-1]                  # a module's package is the one holding it
        if node.level - 1 > len(parts):
            self.fail(node, "a relative import beyond the package")
        base = parts[:len(parts) - (node.level - 1)]
        return ".".join(base + (node.module.split(".") if node.module else []))

    def defined(self) -> dict[str, ast.stmt]:
        """Names this module binds at its top level, by its own statements (not imports)."""
        names: dict[str, ast.stmt] = {}
        for node in self.body:
            for name in bound_names(node):
                names.setdefault(name, node)
        return names

    def imported(self) -> dict[str, str]:
        """Names its other-package imports bind -> what binds them ("import os", "from typing import Any")."""
        out = {}
        for node in self.stdlib:
            for alias in node.names:
                if isinstance(node, ast.Import):
                    bound = alias.asname or alias.name.split(".")[0]
                    origin = alias.name if alias.asname else alias.name.split(".")[0]
                else:
                    if alias.name == "*":
                        self.fail(node, "a star import")
                    bound = alias.asname or alias.name
                    origin = f"{node.module}.{alias.name}"
                out[bound] = origin
        return out

    def used_globals(self) -> set[str]:
        """Global names the module's code reads (annotations aside: they are never evaluated here)."""
        table = symtable.symtable(self.source, self.path, "exec")
        used: set[str] = set()

        def walk(t):
            for s in t.get_symbols():
                if s.is_referenced() and (s.is_global() or (t.get_type() == "module" and not s.is_assigned()
                                                             and not s.is_imported())):
                    used.add(s.get_name())
            for child in t.get_children():
                walk(child)
        walk(table)
        return used


def bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets: list[ast.AST] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    elif isinstance(node, (ast.For, ast.With)):
        targets = [node.target] if isinstance(node, ast.For) else [i.optional_vars for i in node.items if i.optional_vars]
    elif isinstance(node, ast.If):
        return [n for child in node.body + node.orelse for n in bound_names(child)]
    elif isinstance(node, ast.Try):
        return [n for child in node.body + node.orelse + node.finalbody for n in bound_names(child)]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def declared_order(init: Module) -> list[str]:
    """The modules in the order the package's __init__.py declares in LAYERS (a dict of layer -> modules)."""
    for node in init.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "LAYERS" for t in node.targets):
            layers = ast.literal_eval(node.value)
            return [m for modules in layers.values() for m in modules]
    init.fail(None, "no LAYERS in the package's __init__.py")
    return []


def read_package(root: str = ROOT) -> list[Module]:
    """Every module in the declared order, the package's __init__ first; every file listed once."""
    folder = os.path.join(root, PACKAGE)
    init = Module("", os.path.join(folder, "__init__.py"), root)
    order = declared_order(init)
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for file in sorted(filenames):
            if not file.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, file), folder)[:-3].replace(os.sep, ".")
            if rel == "__init__":
                continue
            if rel.endswith(".__init__"):
                sub = Module(rel[:-len(".__init__")], os.path.join(dirpath, file), root)
                if sub.body or sub.stdlib or sub.internal:
                    sub.fail(sub.body[0] if sub.body else None, "a subpackage's __init__.py may hold only a docstring")
                continue
            found[rel] = os.path.join(dirpath, file)
    missing = [m for m in order if m not in found]
    unlisted = sorted(set(found) - set(order))
    twice = sorted({m for m in order if order.count(m) > 1})
    if missing or unlisted or twice:
        raise BuildError(f"{PACKAGE}/__init__.py LAYERS: " + "; ".join(
            part for part in (missing and f"no such module: {', '.join(missing)}",
                              unlisted and f"not listed: {', '.join(unlisted)}",
                              twice and f"listed twice: {', '.join(twice)}") if part))
    return [init] + [Module(name, found[name], root) for name in order]


def check(modules: list[Module]):
    """Fail on anything that would make the joined file differ from the package."""
    position = {m.name: i for i, m in enumerate(modules)}
    defined = {m.name: m.defined() for m in modules}
    owner: dict[str, str] = {}
    imports: dict[str, str] = {}           # bound name -> origin, across the whole file
    import_owner: dict[str, str] = {}
    for m in modules:
        for name, origin in m.imported().items():
            if imports.setdefault(name, origin) != origin:
                m.fail(None, f"{name} is {origin} here and {imports[name]} in {import_owner[name]}")
            import_owner.setdefault(name, m.rel)
    for m in modules:
        local_imports = set(m.imported())
        from_package: set[str] = set()
        for node in m.internal:
            target = m.target(node)
            if target not in position:
                m.fail(node, f"imports {target or PACKAGE}, which is not a module of the package")
            if position[target] >= position[m.name]:
                m.fail(node, f"imports {target}, which comes after it in LAYERS")
            for alias in node.names:
                if alias.asname:
                    m.fail(node, f"renames {alias.name} as {alias.asname}: the joined file has one name for it")
                if alias.name not in defined[target]:
                    m.fail(node, f"imports {alias.name} from {target}, which does not define it")
                from_package.add(alias.name)
        for name, node in defined[m.name].items():
            if name in owner and name not in ("__doc__",):
                m.fail(node, f"{name} is defined in {owner[name]} too")
            if name in imports:
                m.fail(node, f"{name} is defined here and imported ({imports[name]}) in {import_owner[name]}")
            owner[name] = m.rel
        known = set(defined[m.name]) | local_imports | from_package | BUILTINS
        unknown = sorted(m.used_globals() - known)
        if unknown:
            m.fail(None, f"uses {', '.join(unknown)} without defining or importing it")
        if m.name != "paths" and any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(m.tree)):
            m.fail(None, "uses __file__: ask koboldlite.paths where the program's files are")


def embedded_ui_module(root: str = ROOT) -> str:
    """The replacement of web/ui_files.py: embedded_ui/'s files inside the joined file."""
    folder = os.path.join(root, "embedded_ui")
    lines = ["EMBEDDED_UI_FILES = {"]
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for file in sorted(filenames):
            full = os.path.join(dirpath, file)
            with open(full, "rb") as f:
                packed = base64.b64encode(zlib.compress(f.read(), 9)).decode()
            name = os.path.relpath(full, folder).replace(os.sep, "/")
            chunks = [packed[i:i + 100] for i in range(0, len(packed), 100)] or [""]
            lines.append(f"    {name!r}: (")
            lines += [f"        {c!r}" for c in chunks]
            lines.append("    ),")
    lines += ["}", "", "",
              "def ui_files() -> dict[str, bytes]:",
              '    """The built-in page\'s files, carried in this file (zlib, base64) by tools/build_single.py."""',
              "    return {name: zlib.decompress(base64.b64decode(data)) for name, data in EMBEDDED_UI_FILES.items()}"]
    return "\n".join(lines)


def join(modules: list[Module], root: str = ROOT) -> str:
    init = modules[0]
    statements = set()
    for m in modules:
        for node in m.stdlib:
            statements.add(ast.unparse(node))
    if any(m.name == UI_MODULE for m in modules):
        statements |= {"import base64", "import zlib"}
    plain = sorted(s for s in statements if s.startswith("import "))
    merged: dict[str, set[str]] = {}
    for s in statements:
        if s.startswith("from "):
            module, names = s[5:].split(" import ", 1)
            merged.setdefault(module, set()).update(n.strip() for n in names.split(","))
    froms = [f"from {module} import {', '.join(sorted(names))}" for module, names in sorted(merged.items())]
    out = ['"""' + (init.docstring or "").rstrip() + "\n\n"
           "This file is generated by tools/build_single.py from the koboldlite package: edit the package, not this.\n"
           '"""', "", "from __future__ import annotations", "", *plain, *froms]
    lines_of = {}
    for m in modules:
        lines_of[m.name] = m.source.splitlines()
    for m in modules:
        out += ["", "", "# " + "=" * 110, f"# {m.rel}" + (f": {m.docstring.strip().splitlines()[0]}" if m.docstring and m.name else ""),
                "# " + "=" * 110]
        if m.name == UI_MODULE:
            out += ["", "", embedded_ui_module(root)]
            continue
        lines = lines_of[m.name]
        previous_end = 0
        for node in m.body:
            start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
            # Comments between statements go with the statement that follows them.
            gap = lines[previous_end:start - 1]
            comments = [line for line in gap if line.strip().startswith("#")]
            blank_before = 2 if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) or comments else 0
            out += [""] * max(blank_before, 1 if any(not line.strip() for line in gap) else 0)
            out += comments
            out += lines[start - 1:node.end_lineno]
            previous_end = node.end_lineno
    names = tuple([PACKAGE] + [f"{PACKAGE}.{m.name}" for m in modules[1:]]
                  + sorted({f"{PACKAGE}.{m.name.rsplit('.', 1)[0]}" for m in modules[1:] if "." in m.name}))
    out += ["", "", "# " + "=" * 110,
            "# The package's module names this file stands for (tests/harness.py mounts it under them).",
            f"JOINED_MODULES = {names!r}", "", "", 'if __name__ == "__main__":', "    sys.exit(main())", ""]
    return "\n".join(out)


def verify_ui_module(modules: list[Module], root: str = ROOT):
    """The replacement must define what the package's module defines."""
    package_ui = next(m for m in modules if m.name == UI_MODULE)
    replacement = ast.parse(embedded_ui_module(root))
    names = {n for node in replacement.body for n in bound_names(node)}
    missing = sorted(n for n in package_ui.defined() if n not in names)
    if missing:
        package_ui.fail(None, f"defines {', '.join(missing)}, which the joined file's copy of it lacks")


def build(out_path: str, root: str = ROOT) -> str:
    """Check the package under `root`, write the joined file to `out_path`, and return its text."""
    modules = read_package(root)
    check(modules)
    verify_ui_module(modules, root)
    text = join(modules, root)
    compile(text, out_path, "exec")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    temporary = out_path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, out_path)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "dist", "koboldlite.py"), help="default: dist/koboldlite.py")
    args = ap.parse_args(argv)
    try:
        text = build(args.out)
    except BuildError as e:
        print(f"build_single: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {text.count(chr(10))} lines, {len(text.encode()) >> 10} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
