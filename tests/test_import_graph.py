"""The library never imports data_pipelines; every module of both packages imports in a fresh interpreter."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = "data_pipelines"


def _forbidden(name: str | None) -> bool:
    return bool(name) and (name == FORBIDDEN or name.startswith(FORBIDDEN + "."))


def forbidden_imports(source: str, filename: str) -> list[str]:
    """``file:line: what`` for every import of data_pipelines in ``source``, at any depth.

    Covers ``import``, ``from ... import`` and ``importlib.import_module`` / ``__import__`` with a literal name.
    """
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str | None] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        out += [f"{filename}:{node.lineno}: {ast.unparse(node)}" for n in names if _forbidden(n)]
    return out


def module_names(package: str) -> list[str]:
    """Dotted names of every module of a package folder under the repository root (found without importing it)."""
    names = []
    for f in sorted((ROOT / package).rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_scanner_finds_every_kind_of_import():
    src = (
        "import os\nimport data_pipelines.build as b\n"
        "def f():\n    from data_pipelines.base import get_source\n    from mmmat import io\n"
        "class C:\n    def g(self):\n        import importlib\n        importlib.import_module('data_pipelines.cli')\n"
        "        __import__('data_pipelines')\n        from . import data_pipelines\n"
        "'''data_pipelines.base is named in a docstring'''\n"
    )
    found = forbidden_imports(src, "x.py")
    assert [f.split(":")[1] for f in found] == ["2", "4", "9", "10"], found


def test_mmmat_never_imports_data_pipelines():
    files = sorted((ROOT / "mmmat").rglob("*.py"))
    assert len(files) > 50, files
    found = [hit for f in files for hit in forbidden_imports(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, "mmmat must not import data_pipelines:\n" + "\n".join(found)


def test_every_module_imports_in_a_fresh_interpreter():
    lib = module_names("mmmat")
    pipelines = module_names("data_pipelines")
    assert "mmmat.cli" in lib and "data_pipelines.cli" in pipelines
    # the library first (no module of it may pull data_pipelines in, lazily or not), then the plugin package
    # before mmmat.cli, so that the plugin loads while data_pipelines.cli is already imported
    first = [m for m in lib if m != "mmmat.cli"]
    code = (
        "import importlib, json, sys\n"
        f"first, then = {first!r}, {[*pipelines, 'mmmat.cli']!r}\n"
        "for m in first:\n    importlib.import_module(m)\n"
        "pulled = sorted(m for m in sys.modules if m.split('.')[0] == 'data_pipelines')\n"
        "for m in then:\n    importlib.import_module(m)\n"
        "from mmmat import cli\n"
        "print(json.dumps({'pulled': pulled, 'plugin_errors': cli.plugin_errors}))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MMMAT_WARNINGS": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["pulled"] == [], f"importing mmmat pulled in {res['pulled']}"
    assert res["plugin_errors"] == {}, res["plugin_errors"]


def _declared_plugins() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return doc["project"]["entry-points"]["mmmat.cli"]


def test_declared_plugin_adds_the_data_commands():
    import importlib

    from mmmat import cli

    declared = _declared_plugins()
    assert declared == {"data": "data_pipelines.cli:register"}
    mod, _, attr = declared["data"].partition(":")
    register = getattr(importlib.import_module(mod), attr)
    app = typer.Typer()
    register(app)
    data = next(g.typer_instance for g in app.registered_groups if g.name == "data")
    assert {c.name for c in data.registered_commands} == {"build"}
    assert {c.name for c in app.registered_commands} == {"quickstart"}
    # the command line of this checkout has the plugin's commands, not the stand-ins
    assert {(g, n) for g, n in cli.PLUGIN_COMMANDS} == {("data", "build"), (None, "quickstart")}
    r = CliRunner().invoke(cli.app, ["data", "build", "--help"])
    assert r.exit_code == 0 and "--shard-size" in r.output and "Not installed" not in r.output, r.output


def test_a_missing_plugin_command_fails_naming_its_package():
    from mmmat import cli

    app = typer.Typer()
    app.command("quickstart", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
        cli._not_installed("quickstart", "data_pipelines.cli:register"))
    app.command("other")(lambda: None)
    r = CliRunner().invoke(app, ["quickstart", "--out", "x", "--workers", "2"])
    assert r.exit_code == 2
    assert "`mmmat quickstart` is provided by the data_pipelines package" in r.output
    assert "pip install -e ." in r.output and "MMMAT_PLUGINS=data_pipelines.cli:register" in r.output


def test_plugins_named_in_the_environment_load_without_entry_points(monkeypatch):
    import importlib.metadata

    from mmmat import cli

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(cli, "plugin_errors", {})
    monkeypatch.setenv("MMMAT_PLUGINS", "no_such_module_x:register, data_pipelines.cli:register,"
                                        "data_pipelines.cli:register")
    app = typer.Typer()
    assert cli.load_plugins(app) == ["data_pipelines.cli:register"]  # once, though named twice
    assert [c.name for c in app.registered_commands] == ["quickstart"]
    assert list(cli.plugin_errors) == ["no_such_module_x:register"]
    assert "ModuleNotFoundError" in cli.plugin_errors["no_such_module_x:register"]
