"""The package's shape: layers that import downwards only, no import circle, modules a reader can take in."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts in pyproject.toml, over the package found under ``package_root``."""
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run([*LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    res = lint_imports(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in res.stdout


def test_the_import_contracts_fail_when_a_layer_is_broken(tmp_path):
    """A copy of the package whose models layer imports the command line (upwards), and whose
    torch-free config imports torch at module level: both contracts break, naming the import."""
    shutil.copytree(ROOT / "crack_lightning", tmp_path / "crack_lightning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    metrics = tmp_path / "crack_lightning" / "models" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom crack_lightning.cli import guard  # noqa\n")
    schema = tmp_path / "crack_lightning" / "config" / "schema.py"
    schema.write_text(schema.read_text() + "\nimport torch  # noqa\n")
    res = lint_imports(tmp_path)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "Contracts: 0 kept, 2 broken." in res.stdout
    assert "crack_lightning.models.metrics -> crack_lightning.cli.guard" in res.stdout
    assert "crack_lightning.config.schema -> torch" in res.stdout


def test_no_import_circle_and_no_oversized_module():
    """No two modules import each other, however indirectly (function-level imports included), and no
    module outgrows what a reader takes in at once."""
    import grimp

    graph = grimp.build_graph("crack_lightning")
    modules = {m for m in graph.modules if m.startswith("crack_lightning")}
    circles = [(a, b) for a in modules for b in graph.find_modules_directly_imported_by(a)
               if b in modules and a != b and graph.chain_exists(importer=b, imported=a)]
    assert not circles, circles
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in (ROOT / "crack_lightning").rglob("*.py")}
    assert max(sizes.values()) <= 350, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
