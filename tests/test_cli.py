from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from radpretrain.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "radpretrain"
#: What `--help` must not import: each costs from a tenth of a second (numpy) to seconds (torch, timm).
HEAVY = ("torch", "numpy", "timm", "pydicom", "cv2", "PIL", "matplotlib", "scipy", "webdataset", "radpretrain.synth")


def test_help_lists_and_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, parser in sub.choices.items():  # type: ignore[attr-defined]
        assert name in out
        assert parser.description, f"`radpretrain {name} --help` has no description"
        with pytest.raises(SystemExit) as sub_exit:
            main([name, "--help"])
        assert sub_exit.value.code == 0


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_console_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "radpretrain", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("radpretrain ")


# The CLI sits at the edge: the library never imports it, and its help imports no heavy module.


def imported_modules(source: str, module: str) -> set[str]:
    """Every module that `source`, the code of `module`, imports: relative imports resolved, `import_module("x")` too.

    `module` names a package by its `__init__` (`radpretrain.shards.__init__`).
    """
    package = module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from radpretrain import cli`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def imports_cli(source: str, module: str) -> bool:
    names = imported_modules(source, module)
    return any(name == "radpretrain.cli" or name.startswith("radpretrain.cli.") for name in names)


def test_the_check_sees_every_way_to_import_the_cli() -> None:
    for source in (
        "import radpretrain.cli",
        "from radpretrain import cli",
        "from radpretrain.cli.args import positive_int",
        "from ..cli import main",
        "from .. import cli",
        "importlib.import_module('radpretrain.cli.shards')",
    ):
        assert imports_cli(source, "radpretrain.shards.index"), source
    assert imports_cli("from .cli import main", "radpretrain.__init__")
    assert not imports_cli("from radpretrain.config import build\nfrom . import client", "radpretrain.shards.index")


def test_the_library_never_imports_the_cli() -> None:
    cli = PACKAGE / "cli"
    # __main__.py is the `python -m radpretrain` entry point: the edge, like cli/ itself.
    modules = [p for p in PACKAGE.rglob("*.py") if cli not in p.parents and p != PACKAGE / "__main__.py"]
    assert len(modules) > 20 and PACKAGE / "demo.py" in modules
    offenders = sorted(
        str(path.relative_to(ROOT))
        for path in modules
        if imports_cli(path.read_text(), ".".join(path.relative_to(ROOT).with_suffix("").parts))
    )
    assert not offenders, f"library modules import radpretrain.cli: {offenders}"


def _loaded_heavy(names: list[str]) -> list[str]:
    return sorted(n for n in names if any(n == heavy or n.startswith(f"{heavy}.") for heavy in HEAVY))


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_help_imports_no_heavy_module() -> None:
    # `radpretrain --help` itself: -X importtime lists every module the process imported.
    done = _python("-X", "importtime", "-m", "radpretrain", "--help")
    assert done.returncode == 0 and "usage: radpretrain" in done.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "radpretrain.cli.shards" in imported
    assert _loaded_heavy(imported) == []
    # Building the parser and every command's --help, seen from sys.modules inside the process.
    script = (
        "import contextlib, io, json, sys\n"
        "from radpretrain.cli import build_parser, main\n"
        "sub = next(a for a in build_parser()._actions if a.__class__.__name__ == '_SubParsersAction')\n"
        "for argv in (['--help'], *([name, '--help'] for name in sub.choices)):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(json.dumps({'commands': len(sub.choices), 'modules': sorted(sys.modules)}))\n"
    )
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["commands"] >= 11
    assert _loaded_heavy(report["modules"]) == []
