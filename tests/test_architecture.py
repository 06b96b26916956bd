"""The import contracts of pyproject.toml ([tool.importlinter]): floors follow the data, placement
and sim are pure planning floors, no import cycles. Every subpackage of flexmoe has a floor."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

from importlinter import cli as importlinter_cli  # the test extra has it

import flexmoe

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_import_contracts_are_kept():
    assert importlinter_cli.lint_imports(config_filename=str(PYPROJECT), no_cache=True) == 0, (
        "an import breaks the layering; run `lint-imports` for the details"
    )


def test_every_subpackage_has_a_floor():
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    placed = set()
    for contract in contracts:
        for layer in contract.get("layers", []):
            placed |= {name.strip() for name in layer.replace(":", "|").split("|")}
        placed |= set(contract.get("source_modules", []))
    modules = {f"flexmoe.{m.name}" for m in pkgutil.iter_modules(flexmoe.__path__)}
    assert modules - placed == set(), "give every new module a floor in [tool.importlinter]"
