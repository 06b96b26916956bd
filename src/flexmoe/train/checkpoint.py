"""Checkpoints: one folder per step, written atomically, weights in safetensors.

RUN/checkpoints/step_0000123/model.safetensors   parameters and buffers (logical expert view,
                                                 tied weights once), with the model config
RUN/checkpoints/step_0000123/state.pt            optimizer (keyed by parameter name), LR scheduler,
                                                 data position, RNG states, step, configs
RUN/checkpoints/step_0000123/manifest.json      size and sha256 of both files (checked on load)
RUN/checkpoints/latest                           name of the newest complete checkpoint

A checkpoint is written to a hidden temporary folder and renamed into place (``os.replace``),
then ``latest`` is replaced the same way, so a kill at any moment leaves the previous checkpoint
intact; ``clean_temporaries`` removes what a killed or failed write left behind. A checkpoint
holding a non-finite value is never written (nor read back), so rotation can only push out
finite checkpoints in favour of a newer finite one. Reading validates everything (manifest,
checksums, the types of the training state) before the caller changes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..parallel import ParallelExperts, ShardedExperts
from ..parallel.checkpoint import logical_rows, slot_rows

FORMAT = 1
WEIGHTS = "model.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or for another model."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, permissions); the previous one is intact."""


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
    """Write ``step_<step>`` atomically, point ``latest`` at it, keep the ``keep`` newest up to it.

    Refuses non-finite tensors. On an OSError (a full disk) the temporary files are removed and a
    one-line ``CheckpointWriteError`` names the checkpoint that is still the newest.
    """
    bad = nonfinite_tensors(weights, state.get("optimizer", {}))
    if bad:
        raise CheckpointError(f"refusing to write checkpoint step {step}: non-finite values in {_names(bad)}")
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_folder(tmp, step, weights, state, metadata)
        _move_into_place(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for leftover in root.glob(f".latest.tmp-{os.getpid()}"):
            leftover.unlink(missing_ok=True)
        raise CheckpointWriteError(write_failure(run_dir, f"checkpoint {final}", err, final)) from None
    # Rotation counts this checkpoint and older ones: newer ones are of a branch the run left (a
    # resume from an older checkpoint) and go only when this branch rewrites them.
    for old in [p for p in list_checkpoints(run_dir) if p.name <= final.name][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_failure(run_dir: Path, what: str, err: Exception, unfinished: Path | None = None) -> str:
    """One line for a failed write into a run folder: what failed, why, and the checkpoint to resume
    (``err`` an OSError; any other exception is named by its type: a bug, not the disk)."""
    newest = [p.name for p in list_checkpoints(run_dir) if p != unfinished]
    kept = f"the newest checkpoint is still {newest[-1]}" if newest else "no earlier checkpoint exists"
    if not isinstance(err, OSError):
        return f"cannot write {what}: {type(err).__name__}: {err}; {kept} (a flexmoe bug: please report it)"
    return f"cannot write {what}: {err.strerror or err}; {kept} (free space or fix the folder, then --resume)"


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def library_os_error(err: Exception, path: Path) -> Exception:
    """The ``OSError`` behind a Rust library's error (safetensors, tokenizers: "... (os error 28)"),
    for ``path``; ``err`` itself when it names no OS error (then it is not a failed write)."""
    found = _OS_ERROR.search(str(err))
    if found is None:
        return err
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def _write_folder(tmp: Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                  metadata: dict[str, str]) -> None:
    """The three files of one checkpoint in ``tmp``, fsynced, every file with the umask's mode."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / STATE, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", **metadata})
    except SafetensorError as err:  # its Rust writer reports a full disk as this, not as an OSError
        raise library_os_error(err, tmp / WEIGHTS) from None
    os.chmod(tmp / WEIGHTS, (tmp / STATE).stat().st_mode & 0o777)  # safetensors writes 0600
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in (WEIGHTS, STATE)}
    _atomic_write_text(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    _fsync_dir(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # the same step again (a resumed branch): the old copy goes only once replaced
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)


def clean_temporaries(run_dir: Path) -> list[str]:
    """Remove what killed or failed writes left in a run folder; returns the names removed.

    A ``.stale-step_N-*`` folder whose ``step_N`` is missing (a kill between the two renames of
    a re-written step) is the only copy of that checkpoint: it is renamed back, not removed.
    """
    run_dir, root = Path(run_dir), checkpoint_root(run_dir)
    removed = []
    for folder in (run_dir, root):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            name = path.name
            if name.startswith(".stale-step_"):
                final = root / name[len(".stale-"):].rsplit("-", 1)[0]
                if not final.exists():
                    os.replace(path, final)
                    continue
            elif not (name.startswith(".") and ".tmp-" in name):  # .tmp-step_N-PID, .latest.tmp-PID, ...
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(str(path.relative_to(run_dir)))
    return removed


def nonfinite_tensors(*trees) -> list[str]:
    """Names (dotted paths) of the floating-point tensors in nested dicts/lists holding NaN or inf."""
    bad: list[str] = []

    def visit(item, name: str) -> None:
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and item.numel() and not bool(torch.isfinite(item).all()):
                bad.append(name)
        elif isinstance(item, dict):
            for key, value in item.items():
                visit(value, f"{name}.{key}" if name else str(key))
        elif isinstance(item, (list, tuple)):
            for i, value in enumerate(item):
                visit(value, f"{name}.{i}" if name else str(i))

    for i, tree in enumerate(trees):
        visit(tree, "" if i == 0 else "optimizer")
    return bad


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (its ``latest``), a checkpoints folder, or itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint found: {path} does not exist")
    if any((path / name).exists() for name in (WEIGHTS, STATE, MANIFEST)):
        return path
    for root in (checkpoint_root(path), path):
        latest = root / "latest"
        if latest.is_file():
            name = latest.read_text(errors="replace").strip()
            if not re.fullmatch(r"step_\d+", name):
                raise CheckpointError(f"{latest} is corrupt (it names {name[:40]!r}, not a step_N folder)")
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
        files = _manifest_files(json.loads(manifest.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint file {manifest} is corrupt ({err})") from None
    for name in (WEIGHTS, STATE):
        file = path / name
        if name not in files or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete (no {name})")
        if file.stat().st_size != files[name]["bytes"] or _sha256(file) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupt (its checksum does not match {MANIFEST})")


def _manifest_files(manifest) -> dict:
    """The ``files`` table of a parsed manifest, every entry checked for its type."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("expected an object with a 'files' object")
    if isinstance(manifest.get("step"), bool) or not isinstance(manifest.get("step"), int):
        raise ValueError(f"'step' must be an integer, got {manifest.get('step')!r}")
    for name, entry in manifest["files"].items():
        if (not isinstance(entry, dict) or isinstance(entry.get("bytes"), bool)
                or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str)):
            raise ValueError(f"entry {name!r} must hold an integer 'bytes' and a string 'sha256'")
    return manifest["files"]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Verified weights, weight metadata and training state of one checkpoint folder.

    A checkpoint holding NaN or inf (written before flexmoe refused them) is refused too."""
    verify_checkpoint(path)
    weights, metadata = read_weights(path)
    state = read_state(path)
    bad = nonfinite_tensors(weights, state.get("optimizer", {}))
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values ({_names(bad)}); "
                              "it cannot be resumed or trained from")
    return weights, metadata, state


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


# Entries of state.pt that every reader needs, with their types.
_STATE_TYPES = {"step": int, "tokens_seen": int, "elapsed_s": (int, float), "data": dict, "optimizer": dict,
                "scheduler": dict, "rng": list, "world_size": int, "model_config": dict, "train_config": dict}


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


def check_training_state(path: Path, state: dict) -> None:
    """Every entry a resume reads is in ``state`` (of checkpoint folder ``path``) with its type."""
    file = Path(path) / STATE
    for key, kind in _STATE_TYPES.items():
        value = state.get(key)
        if key not in state or isinstance(value, bool) or not isinstance(value, kind):
            got = "missing" if key not in state else f"a {type(value).__name__}, not {_type_names(kind)}"
            raise CheckpointError(f"checkpoint file {file} is corrupt: its {key!r} entry is {got}")
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise CheckpointError(f"checkpoint file {file} is corrupt: its optimizer state lacks 'state' or 'param_groups'")


def _type_names(kind) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def intact_older(root: Path, before: str | None = None) -> Path | None:
    """The newest checkpoint folder in ``root`` (a run's checkpoints folder) whose name sorts before
    ``before`` and that verifies and reads completely, or None: what to suggest instead of a
    corrupt checkpoint."""
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")) if root.is_dir() else []
    for other in reversed(found):
        if before is not None and other.name >= before:
            continue
        try:
            check_training_state(other, read_checkpoint(other)[2])
        except CheckpointError:
            continue
        return other
    return None


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
    each from its first replica (replicas hold equal state); adaptive layers' shards -> whole
    experts. Collective over each EP group."""
    for name, stage in _ep_expert_params(model).items():
        state = saved["state"].get(name)
        slots = stage.placement.slots_per_rank
        for key, value in list((state or {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == slots:
                state[key] = logical_rows(stage.ep_group, stage.placement, value).cpu()
    for name, (stage, pname) in _sharded_expert_params(model).items():
        state = saved["state"].get(name)
        shape = getattr(stage, pname).shape
        for key, value in list((state or {}).items()):
            if isinstance(value, torch.Tensor) and value.shape == shape:
                state[key] = stage.logical(pname, value).cpu()
    return saved


def optimizer_state_to_slots(model: nn.Module, saved: dict) -> dict:
    """Inverse of ``optimizer_state_to_logical`` for this rank's current placement tables."""
    for name, stage in _ep_expert_params(model).items():
        state = saved["state"].get(name)
        E = stage.config.num_experts
        for key, value in list((state or {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == E:
                state[key] = slot_rows(stage.placement, stage.rank, value)
    for name, (stage, pname) in _sharded_expert_params(model).items():
        state = saved["state"].get(name)
        for key, value in list((state or {}).items()):
            if isinstance(value, torch.Tensor) and tuple(value.shape) == stage.logical_shape(pname):
                state[key] = stage.shard(pname, value)
    return saved


def _sharded_expert_params(model: nn.Module) -> dict[str, tuple[ShardedExperts, str]]:
    """Parameter name -> (its adaptive sharded stage, the name within the stage)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ShardedExperts):
            for pname, _ in module.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = (module, pname)
    return out
