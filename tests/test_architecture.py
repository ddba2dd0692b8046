"""The package's shape: no import cycle, imports only go down the layers, modules stay small.

The import graph is read with `ast` (nothing is imported), counting module-level, function-level
and `TYPE_CHECKING` imports alike. Layers, lowest first (a module may import its own layer's
package and anything below; sibling packages on one layer do not import each other):

    0  embfilter_cli (the package root), errors, files, safetensors_header, any other top-level helper
    1  model
    2  filters
    3  vectors, export, text
    4  engines                        (Parquet/Ray/Spark jobs joining vectors and text; the core ends
                                       here: never click, rich, console or commands)
    5  api, console                   (the Python library: fit, load, Filter, Encoder, which the commands
                                       call; the output channels for the commands. Neither imports the
                                       other: the library reports through `api.hooks.Hooks`)
    6  commands
    7  cli, completion, __main__      (the edge)

One edge goes up on purpose: the package root re-exports the library's names (`embfilter_cli.fit`,
...) through a module `__getattr__`, so `import embfilter_cli` stays light. That edge
(`LAZY_REEXPORTS`) is left out of the graph, and a test checks that the root imports nothing of
the package at module level.

The light `--help` import check lives in tests/test_cli_basics.py
(`test_help_and_version_do_not_import_heavy_libraries` imports `embfilter_cli.cli` and runs
`embfilter --help` in a fresh interpreter); it is not repeated here.

`KNOWN_VIOLATIONS` and the size allow-lists may only shrink: an entry that no longer occurs
fails the test too, so whoever fixes one removes its line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embfilter_cli"

LAYERS: dict[str, int] = {
    "model": 1,
    "filters": 2,
    "vectors": 3,
    "export": 3,
    "text": 3,
    "engines": 4,
    "api": 5,
    "console": 5,
    "commands": 6,
    "cli": 7,
    "completion": 7,
    "__main__": 7,
}
CORE = ("model", "filters", "vectors", "export", "text", "engines")
# The library may not print either: no click, rich or console.
NO_EDGE = (*CORE, "api")
# The root's lazy `__getattr__` re-export of the library (see the module docstring).
LAZY_REEXPORTS = {"embfilter_cli": {"embfilter_cli.api"}}
EDGE_LIBRARIES = ("click", "rich")

# "importer -> imported" edges that break the rules today. Being removed in issue 7; delete the
# line with the fix (the test fails while a listed edge no longer exists).
KNOWN_VIOLATIONS: set[str] = set()

COMMAND_MAX_LINES = 250
CORE_MAX_LINES = 450
# Modules over their limit today (paths relative to embfilter_cli/). Shrink-only, like above.
OVERSIZED: set[str] = set()


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module imported anywhere in `path`: our modules by dotted name, others by top-level name."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    ours = {m for m in out if m == "embfilter_cli" or m.startswith("embfilter_cli.")}
    theirs = {m.split(".")[0] for m in out - ours}
    # `import embfilter_cli.a.b` names a module; `from embfilter_cli.a.b import f` names its module too.
    resolved = set()
    for m in ours:
        while m not in known and "." in m:
            m = m.rsplit(".", 1)[0]
        resolved.add(m)
    return (resolved - {name}) | theirs


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) - LAZY_REEXPORTS.get(name, set()) for name, path in known.items()}


def part(module: str) -> str:
    """The layer key of a module: its first component under embfilter_cli ('' for the root)."""
    rest = module.split(".")[1:]
    return rest[0] if rest else ""


def layer(module: str) -> int:
    return LAYERS.get(part(module), 0)


def violations(g: dict[str, set[str]]) -> set[str]:
    found = set()
    for importer, targets in g.items():
        for target in targets:
            if not target.startswith("embfilter_cli"):
                if part(importer) in NO_EDGE and target in EDGE_LIBRARIES:
                    found.add(f"{importer} -> {target}")
                continue
            same_part = part(importer) == part(target)
            if layer(target) > layer(importer) or (
                layer(target) == layer(importer)
                and not same_part
                and layer(importer) != 0
                and layer(importer) != LAYERS["cli"]
            ):
                found.add(f"{importer} -> {target}")
    return found


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if nxt not in g:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_walker_sees_function_level_relative_and_type_checking_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import embfilter_cli.model.hub\n"
        "from . import band\n"
        "from ..errors import EmbfilterError\n"
        "if TYPE_CHECKING:\n    from embfilter_cli.text import lens\n"
        "def f():\n    import rich.progress\n    from embfilter_cli.console import info\n"
    )
    known = modules()
    got = imports_of("embfilter_cli.filters.mod", source, known)
    assert got == {
        "typing",
        "embfilter_cli.model.hub",
        "embfilter_cli.filters.band",
        "embfilter_cli.errors",
        "embfilter_cli.text.lens",
        "rich",
        "embfilter_cli.console",
    }
    # On the real package: cli imports console inside a function body only.
    assert "embfilter_cli.console" in graph()["embfilter_cli.cli"]


def test_find_cycle_and_violations_on_a_toy_graph():
    toy = {
        "embfilter_cli.model.a": {"embfilter_cli.filters.b", "numpy"},
        "embfilter_cli.filters.b": {"embfilter_cli.model.a"},
        "embfilter_cli.text.c": {"embfilter_cli.export.d", "rich"},
        "embfilter_cli.export.d": set(),
    }
    cycle = find_cycle(toy)
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 3
    assert set(cycle) == {"embfilter_cli.model.a", "embfilter_cli.filters.b"}
    assert violations(toy) == {
        "embfilter_cli.model.a -> embfilter_cli.filters.b",
        "embfilter_cli.text.c -> embfilter_cli.export.d",
        "embfilter_cli.text.c -> rich",
    }
    assert find_cycle({"embfilter_cli.a": {"embfilter_cli.b"}, "embfilter_cli.b": set()}) is None


def test_the_root_imports_the_library_only_lazily():
    """`import embfilter_cli` (what `embfilter --help` does) runs no import of the package's modules."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    top_level = [
        node
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and ((node.module or "") if isinstance(node, ast.ImportFrom) else node.names[0].name).startswith(
            "embfilter_cli"
        )
    ]
    assert top_level == []
    raw = imports_of("embfilter_cli", PACKAGE / "__init__.py", modules())
    assert {m for m in raw if m.startswith("embfilter_cli")} == LAZY_REEXPORTS["embfilter_cli"]


def test_the_library_never_imports_the_console():
    g = graph()
    assert not {
        t for name, targets in g.items() if part(name) == "api" for t in targets if part(t) in ("console", "commands")
    }


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_imports_only_go_down_the_layers():
    found = violations(graph())
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "imports against the layering (see this file's docstring):\n  " + "\n  ".join(new)
    gone = sorted(KNOWN_VIOLATIONS - found)
    assert not gone, "fixed, so remove from KNOWN_VIOLATIONS:\n  " + "\n  ".join(gone)


def _too_long() -> set[str]:
    out = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        limit = COMMAND_MAX_LINES if rel.startswith("commands/") else CORE_MAX_LINES
        if len(path.read_text().splitlines()) > limit:
            out.add(rel)
    return out


def test_module_sizes():
    found = _too_long()
    new = sorted(found - OVERSIZED)
    assert not new, f"over {COMMAND_MAX_LINES} lines (commands) / {CORE_MAX_LINES} (others); split them: {new}"
    gone = sorted(OVERSIZED - found)
    assert not gone, f"now within the limit, so remove from OVERSIZED: {gone}"
