"""Imports point one way: library <- engines <- CLI. Read from the source with ast, so lazy
imports inside functions count too."""

import ast
from pathlib import Path

WBC = Path(__file__).resolve().parents[1] / "wbc"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from wbc import engine` -> wbc.engine)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _modules(*exclude: str) -> dict[str, set[str]]:
    return {str(p.relative_to(WBC.parent)): _imports(p) for p in sorted(WBC.rglob("*.py"))
            if not any(p.is_relative_to(WBC / e) for e in exclude)}


def _hits(mods: dict[str, set[str]], prefix: str) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imps in mods.items() for i in imps
                  if i == prefix or i.startswith(prefix + "."))


def test_no_library_module_imports_an_engine_or_the_cli():
    library = _modules("engine", "cli", "__main__.py")
    assert len(library) > 30  # the walk found the library
    assert _hits(library, "wbc.engine") == []
    assert _hits(library, "wbc.cli") == []


def test_engines_do_not_import_the_cli():
    engines = {m: i for m, i in _modules("cli", "__main__.py").items() if m.startswith("wbc/engine/")}
    assert engines and _hits(engines, "wbc.cli") == []


def test_only_the_cli_imports_typer():
    assert _hits(_modules("cli"), "typer") == []


def test_the_check_sees_lazy_and_from_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from wbc import engine\n    import typer.core\n")
    assert _hits({"m": _imports(src)}, "wbc.engine") == ["m imports wbc.engine"]
    assert _hits({"m": _imports(src)}, "typer") == ["m imports typer.core"]
