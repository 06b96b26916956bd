"""Checkpoints: one folder per step, written atomically, weights in safetensors.

RUN/checkpoints/step_0000123/model.safetensors   parameters and buffers (logical expert view,
                                                 tied weights once), with the model config
RUN/checkpoints/step_0000123/state.pt            optimizer (keyed by parameter name), LR scheduler,
                                                 data position, RNG states, step, configs
RUN/checkpoints/step_0000123/manifest.json      size and sha256 of both files (checked on load)
RUN/checkpoints/latest                           name of the newest complete checkpoint

A checkpoint is written to a hidden temporary folder and renamed into place (``os.replace``),
then ``latest`` is replaced the same way, so a kill at any moment leaves the previous checkpoint
intact. Reading validates everything before the caller changes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..parallel import ParallelExperts
from ..parallel.checkpoint import logical_rows, slot_rows

FORMAT = 1
WEIGHTS = "model.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or for another model."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each shared tensor (tied embeddings) kept once, contiguous."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                    metadata: dict[str, str], keep: int) -> Path:
    """Write ``step_<step>`` atomically, point ``latest`` at it, keep the ``keep`` newest."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", **metadata})
    with open(tmp / STATE, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in (WEIGHTS, STATE)}
    _atomic_write_text(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        stale = root / f".stale-{final.name}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name + "\n")
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (its ``latest``), a checkpoints folder, or itself."""
    path = Path(path)
    if any((path / name).exists() for name in (WEIGHTS, STATE, MANIFEST)):
        return path
    for root in (checkpoint_root(path), path):
        latest = root / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            if (root / name).is_dir():
                return root / name
            raise CheckpointError(f"{latest} names {name!r}, which does not exist")
        found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")) if root.is_dir() else []
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint found at {path}")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Check the manifest: both files present with the recorded size and sha256."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST})")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({err})") from None
    for name in (WEIGHTS, STATE):
        file = path / name
        if name not in files or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete (no {name})")
        if file.stat().st_size != files[name]["bytes"] or _sha256(file) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupt (its checksum does not match {MANIFEST})")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Verified weights, weight metadata and training state of one checkpoint folder."""
    verify_checkpoint(path)
    weights, metadata = read_weights(path)
    return weights, metadata, read_state(path)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of ``model.safetensors`` in a checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path if path.is_file() else path / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS}")
    try:
        weights = load_file(str(file))
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint file {file} is corrupt or unreadable: {err}") from None
    return weights, metadata


def read_state(path: Path) -> dict:
    """The training state of a checkpoint folder."""
    file = Path(path) / STATE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {STATE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on a damaged file
        raise CheckpointError(f"checkpoint file {file} is corrupt or unreadable: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {file} is not a flexmoe training state (format {FORMAT})")
    return state


def check_weights_fit(model: nn.Module, weights: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Raise CheckpointError listing every missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in unique_state_dict(model).items()}
    problems = []
    for name, shape in expected.items():
        if name not in weights:
            problems.append(f"missing {name} {list(shape)}")
        elif tuple(weights[name].shape) != shape:
            problems.append(f"{name}: checkpoint {list(weights[name].shape)}, model {list(shape)}")
    problems += [f"unexpected {name}" for name in weights if name not in expected]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"checkpoint {source} was written for another model shape ({shown}){hint}")


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy checked weights into ``model`` (tied parameters get their one stored copy)."""
    missing = set(model.state_dict()) - set(weights)
    model.load_state_dict(weights, strict=False)
    for name in missing:
        if name not in dict(model.named_parameters(remove_duplicate=False)):
            raise CheckpointError(f"checkpoint lacks {name}")


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name (independent of parameter order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    index_name = {}
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index_name[i] = names[id(p)]
            i += 1
    sd = optimizer.state_dict()
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index_name[j] for j in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": {index_name[j]: dict(s) for j, s in sd["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, source: str) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved_order = [n for g in saved["param_groups"] for n in g["params"]]
    if sorted(order) != sorted(saved_order):
        raise CheckpointError(f"checkpoint {source}: optimizer state is for other parameters")
    index = {n: i for i, n in enumerate(order)}
    current = optimizer.state_dict()
    groups = []
    for g_now, g_saved in zip(current["param_groups"], saved["param_groups"]):
        groups.append({**{k: v for k, v in g_saved.items() if k != "params"}, "params": g_now["params"]})
    if len(groups) != len(current["param_groups"]) or [len(g["params"]) for g in saved["param_groups"]] != [
        len(g["params"]) for g in current["param_groups"]
    ]:
        raise CheckpointError(f"checkpoint {source}: optimizer parameter groups differ")
    state = {index[n]: s for n, s in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def metadata_json(**items) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in items.items()}


def _ep_expert_params(model: nn.Module) -> dict[str, ParallelExperts]:
    """Parameter name -> its expert-parallel stage, for every expert parameter."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ParallelExperts):
            for pname, _ in module.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = module
    return out


def optimizer_state_to_logical(model: nn.Module, saved: dict) -> dict:
    """Expert rows of the optimizer state (this rank's slots) -> all experts in logical order,
    each from its first replica (replicas hold equal state). Collective over each EP group."""
    for name, stage in _ep_expert_params(model).items():
        state = saved["state"].get(name)
        slots = stage.placement.slots_per_rank
        for key, value in list((state or {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == slots:
                state[key] = logical_rows(stage.ep_group, stage.placement, value).cpu()
    return saved


def optimizer_state_to_slots(model: nn.Module, saved: dict) -> dict:
    """Inverse of ``optimizer_state_to_logical`` for this rank's current placement tables."""
    for name, stage in _ep_expert_params(model).items():
        state = saved["state"].get(name)
        E = stage.config.num_experts
        for key, value in list((state or {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == E:
                state[key] = slot_rows(stage.placement, stage.rank, value)
    return saved
