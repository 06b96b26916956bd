"""What ``--resume`` may change: options are compared with the configs of the run being resumed.

An option given with ``--resume`` whose value differs from the run's is refused unless
``--override`` names it; such a change is recorded in the run's ``config.json`` (``resumes``).
Options that define the model or the data never change on a resume, not even with ``--override``:
the checkpoint's weights, tokens and data position would no longer mean what they meant.
Options are named as on the command line without the dashes: ``steps``, ``lr``, ``dts-tau-min``.
"""

from __future__ import annotations

import dataclasses

from ..config import DTSGateConfig
from ..models.gpt import ModelConfig
from .config import TrainConfig

# ModelConfig / DTSGateConfig fields a resume may change (with --override); every other one is
# part of the model. vocab_size is not an option (the tokenizer sets it).
_MODEL_CHANGEABLE = {"aux_loss_coef", "z_loss_coef", "bias_update_rate", "kernels"}
_DTS_CHANGEABLE = {"tau_max", "tau_min", "anneal_steps", "schedule", "threshold", "sparse_step"}
_MODEL_FIXED = "it defines the model: another value is another model shape or maths than the checkpoint's"
# TrainConfig fields a resume can never change, and why.
_TRAIN_FIXED = {
    "tokenizer": "the model was trained on this tokenizer's tokens",
    "bpe_vocab_size": "the model was trained on this tokenizer's tokens",
    "data": "the checkpoint's data position refers to this corpus",
    "val_fraction": "it changes the training/validation split the checkpoint's data position refers to",
    "seed": "it changes the data order the checkpoint's data position refers to",
}


@dataclasses.dataclass(frozen=True)
class Change:
    """One option whose value differs from the run's; ``fixed`` says why it may never change."""

    option: str
    old: object
    new: object
    fixed: str | None


def _options() -> dict[str, tuple[str, str | None]]:
    """option name -> (section, why it is fixed or None) for every config field with an option."""
    out = {}
    for field in dataclasses.fields(ModelConfig):
        if field.name not in ("vocab_size", "dts"):
            fixed = None if field.name in _MODEL_CHANGEABLE else _MODEL_FIXED
            out[field.name.replace("_", "-")] = ("model", fixed)
    for field in dataclasses.fields(DTSGateConfig):
        fixed = None if field.name in _DTS_CHANGEABLE else _MODEL_FIXED
        out["dts-" + field.name.replace("_", "-")] = ("dts", fixed)
    for field in dataclasses.fields(TrainConfig):
        out[field.name.replace("_", "-")] = ("train", _TRAIN_FIXED.get(field.name))
    return out


def parse_override(text: str | None) -> frozenset[str]:
    """The option names of ``--override a,b`` (dashes or underscores); unknown or fixed names raise."""
    if not text:
        return frozenset()
    options = _options()
    names = set()
    for raw in text.split(","):
        name = raw.strip().lstrip("-").replace("_", "-")
        if not name:
            continue
        if name not in options:
            raise ValueError(f"--override: {raw.strip()!r} is not an option of flexmoe train "
                             "(name options as on the command line, comma-separated: --override steps,lr)")
        if options[name][1] is not None:
            raise ValueError(f"--override {name}: --{name} cannot change on a resume: {options[name][1]}; "
                             "start a new run (another --run-dir) instead")
        names.add(name)
    return frozenset(names)


def config_changes(old_model: ModelConfig, old_train: TrainConfig, new_model: ModelConfig,
                   new_train: TrainConfig) -> list[Change]:
    """Every option whose value differs between the run's configs and the requested ones."""
    old = _flat(old_model, old_train)
    new = _flat(new_model, new_train)
    return [Change(name, old[name], new[name], fixed) for name, (_, fixed) in _options().items()
            if old[name] != new[name]]


def _flat(model: ModelConfig, train: TrainConfig) -> dict[str, object]:
    model_fields = model.to_dict()
    sections = {"dts": dict(model_fields.pop("dts")), "model": model_fields, "train": train.to_dict()}
    return {name: sections[section][(name[4:] if section == "dts" else name).replace("-", "_")]
            for name, (section, _) in _options().items()}


def check_changes(changes: list[Change], allowed: frozenset[str], source: str) -> None:
    """Raise one ValueError naming every refused change with both values, and what to do."""
    fixed = [c for c in changes if c.fixed]
    if fixed:
        shown = "; ".join(f"--{c.option} cannot change (run {c.old!r}, given {c.new!r}): {c.fixed}" for c in fixed)
        raise ValueError(f"--resume {source}: {shown}; leave these options out, or start a new run (another --run-dir)")
    refused = [c for c in changes if c.option not in allowed]
    if refused:
        shown = ", ".join(f"--{c.option} {c.old!r} -> {c.new!r}" for c in refused)
        names = ",".join(c.option for c in changes)
        raise ValueError(f"--resume {source}: options differ from the run's ({shown}); leave them out to "
                         f"continue unchanged, or allow the change with --override {names} (recorded in config.json)")


def history_entry(step: int, source: str, world_size: int, changes: list[Change]) -> dict:
    """One record of the ``resumes`` list in config.json."""
    return {"step": step, "checkpoint": source, "world_size": world_size,
            "changed": {c.option: [c.old, c.new] for c in changes}}
