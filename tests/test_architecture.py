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


def test_the_layer_chooses_its_expert_stage_at_construction():
    """Local or expert-parallel, chosen once by MoELayer.__init__ and found by type; both keep
    the parameter names and logical shapes that checkpoints and HF loading depend on."""
    import torch

    from flexmoe.experts import GroupedExperts
    from flexmoe.parallel import ParallelExperts, ep_stage

    cfg = flexmoe.MoEConfig(d_model=8, d_ff=6, num_experts=4, top_k=2)
    torch.manual_seed(0)
    local = flexmoe.MoELayer(cfg)
    torch.manual_seed(0)
    ep = flexmoe.MoELayer(cfg, placement=flexmoe.PlacementTable.static(4, 1, slots_per_rank=6))
    assert type(local.experts) is GroupedExperts and ep_stage(local) is None
    assert isinstance(ep.experts, ParallelExperts) and ep_stage(ep) is ep.experts
    assert ep.experts.gate_up_proj.shape[0] == 6, "the stage holds this rank's slots"
    local_sd, ep_sd = local.state_dict(), ep.state_dict()
    assert list(local_sd) == list(ep_sd) and {"experts.gate_up_proj", "experts.down_proj"} <= set(ep_sd)
    assert all(torch.equal(local_sd[k], ep_sd[k]) for k in local_sd), "logical view, same weights"
