"""One ``flexmoe train`` run: resolve configs, check every input, then train.

``prepare`` reads and validates everything (configs, data, tokenizer, checkpoints) and writes
nothing, so a bad data path or checkpoint leaves the run folder as it was; ``execute`` writes.
Config precedence: preset < the checkpoint's saved configs (on --resume) < explicit options;
an explicit option that changes the resumed run's config must be named by ``--override``
(``resume.py``), and the change is recorded in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import DTSGateConfig
from ..models.gpt import GPTMoE, ModelConfig
from . import checkpoint as ckpt
from . import resume
from .config import PRESETS, TrainConfig
from .data import Corpus, DataError, WindowStream, load_corpus, validation_windows
from .diversify import DiversifyConfig, diversify_from_dense
from .distributed import DistInfo, main_rank_error, rank_seed
from .guard import DivergenceError
from .loop import Trainer
from .metrics import METRICS, MetricsLog, last_per_step, read_metrics, truncate_metrics
from .tokenizer import make_tokenizer

TRACE = "routing_trace.jsonl"
TOKENIZER = "tokenizer.json"
TOKEN_CACHE = "tokens_cache.npz"


@dataclasses.dataclass
class RunOptions:
    """What the command line asked for (overrides hold only options given explicitly)."""

    preset: str = "tiny"
    run_dir: str | None = None
    resume: str | None = None
    init_from_dense: str | None = None
    diversify_noise: float = 0.1
    diversify_mask: float = 0.0
    stop_at: int | None = None
    override: str | None = None
    progress: bool = True
    model_overrides: dict = dataclasses.field(default_factory=dict)
    dts_overrides: dict = dataclasses.field(default_factory=dict)
    train_overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Prepared:
    options: RunOptions
    run_dir: Path
    info: DistInfo
    device: torch.device
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    corpus: Corpus
    tokenizer: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    trainer: Trainer
    resumed_from: Path | None
    token_cache_hit: bool
    history: dict | None = None  # on --resume: "preset" and "resumes" of the run's config.json, this one added


def setup_distributed() -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _resolve_configs(options: RunOptions, saved: dict | None) -> tuple[ModelConfig, TrainConfig]:
    if options.preset not in PRESETS:
        raise ValueError(f"unknown preset {options.preset!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[options.preset]
    model = {**preset.model, **(saved["model_config"] if saved else {})}
    train = {**preset.train, **(saved["train_config"] if saved else {})}
    dts = dict(model.pop("dts", {}) or {})
    model.update(options.model_overrides)
    dts.update(options.dts_overrides)
    train.update(options.train_overrides)
    return ModelConfig(**model, dts=DTSGateConfig(**dts)), TrainConfig(**train)


def _holds_run(run_dir: Path) -> bool:
    """A run folder with a checkpoint; one killed before its first checkpoint can start again."""
    return bool(ckpt.list_checkpoints(run_dir))


def _read_resumed(options: RunOptions) -> tuple[Path, Path, dict, dict]:
    """The checkpoint ``--resume`` names, its run folder, weights and state; a corrupt one's error
    names an intact older checkpoint of the run when there is one."""
    if options.resume == "latest" and options.run_dir is None:
        raise ValueError("--resume needs --run-dir (or --resume PATH to a run or checkpoint folder)")
    target = Path(options.run_dir if options.resume == "latest" else options.resume)
    if not ckpt.list_checkpoints(target) and any((target / n).exists() for n in (METRICS, "config.json")):
        raise ckpt.CheckpointError(f"{target} holds no complete checkpoint (the run stopped before its first one): "
                                   f"nothing to resume; start it again with --run-dir {target} and without --resume")
    try:
        resumed_from = ckpt.resolve_checkpoint(target)
    except ckpt.CheckpointError as err:
        raise _with_older(err, ckpt.checkpoint_root(target), None) from None
    run_dir = Path(options.run_dir) if options.run_dir else resumed_from.parent.parent
    try:
        weights, _, state = ckpt.read_checkpoint(resumed_from)
        ckpt.check_training_state(resumed_from, state)
    except ckpt.CheckpointError as err:
        raise _with_older(err, resumed_from.parent, resumed_from.name) from None
    return resumed_from, run_dir, weights, state


def _with_older(err: Exception, root: Path, before: str | None) -> ckpt.CheckpointError:
    """``err`` with the advice to resume from the newest intact checkpoint in ``root`` before ``before``."""
    older = ckpt.intact_older(root, before)
    hint = f"; the {'older ' if before else ''}checkpoint {older} is intact: continue from it with --resume {older}"
    return ckpt.CheckpointError(f"{err}{hint if older else ''}")


def _check_resume(options: RunOptions, saved: dict, source: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                  run_dir: Path, world_size: int) -> dict:
    """Refuse changed options that --override does not name, and a finished run; returns the run's
    history (config.json's preset and resumes) with this resume added."""
    plain = dataclasses.replace(options, model_overrides={}, dts_overrides={}, train_overrides={})
    old_model, old_train = _resolve_configs(plain, saved)
    changes = resume.config_changes(old_model, old_train, model_cfg, train_cfg)
    resume.check_changes(changes, resume.parse_override(options.override), str(source))
    step = saved["step"]
    summarised = any(r.get("kind") == "summary" and r.get("step") == step for r in read_metrics(run_dir))
    if step > train_cfg.steps or (step == train_cfg.steps and summarised):  # else: killed before its summary
        extend = (f"the run finished at step {step}" if step == train_cfg.steps
                  else f"--steps {train_cfg.steps} is before its step {step}")
        raise ValueError(f"--resume {source}: {extend}: nothing to train; to train further pass a larger --steps "
                         "with --override steps")
    history = {"preset": options.preset, "resumes": []}
    config_file = run_dir / "config.json"
    if not config_file.is_file():  # a branch into a new folder inherits the history of its source run
        config_file = source.parent.parent / "config.json"
    if config_file.is_file():
        try:
            old = json.loads(config_file.read_text())
            history = {"preset": old.get("preset", options.preset), "resumes": list(old.get("resumes", []))}
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"{config_file} is not a flexmoe run config (its history would be lost); "
                             "repair or remove it, then resume again") from None
    history["resumes"].append(resume.history_entry(step, str(source), world_size, changes))
    return history


def prepare(options: RunOptions, info: DistInfo | None = None) -> Prepared:
    """Validate everything and build the trainer; writes nothing."""
    info = info or DistInfo()
    spawn = DiversifyConfig(options.diversify_noise, options.diversify_mask)
    saved_state = weights = None
    resumed_from = None
    if options.resume is not None:
        resumed_from, run_dir, weights, saved_state = _read_resumed(options)
    else:
        if options.override:
            raise ValueError("--override only applies with --resume (it names the options a resumed run may change)")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(options.run_dir) if options.run_dir else Path("runs") / f"{options.preset}-{stamp}"
        if _holds_run(run_dir):
            raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or pick another --run-dir")
    try:
        model_cfg, train_cfg = _resolve_configs(options, saved_state)
    except TypeError as err:
        raise ValueError(f"bad configuration: {err}") from None
    history = None
    if saved_state is not None:
        history = _check_resume(options, saved_state, resumed_from, model_cfg, train_cfg, run_dir, info.world_size)
    device = pick_device(train_cfg.device)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the MoE layers) on tensor cores

    corpus = load_corpus(train_cfg.data, train_cfg.val_fraction)
    if saved_state is not None and saved_state.get("corpus") not in (None, corpus.fingerprint()):
        raise DataError(
            f"the corpus at {corpus.root} differs from the one checkpoint {resumed_from} was trained on "
            "(pass the same --data, or start a new run)"
        )
    tok_file = run_dir / TOKENIZER
    if resumed_from is not None and (resumed_from.parent.parent / TOKENIZER).is_file():
        tok_file = resumed_from.parent.parent / TOKENIZER  # the run the checkpoint belongs to (a branch-off)
    if saved_state is not None and train_cfg.tokenizer == "bpe" and not tok_file.exists():
        raise ckpt.CheckpointError(f"cannot resume a BPE run without its tokenizer file {tok_file}")
    tokenizer = make_tokenizer(train_cfg.tokenizer, corpus.train_docs, train_cfg.bpe_vocab_size,
                               tok_file if saved_state is not None else None)
    train_tokens, val_tokens, cache_hit = _encode(corpus, tokenizer, train_cfg, run_dir)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)

    torch.manual_seed(train_cfg.seed)
    model = _build_model(model_cfg, train_cfg, info, device)
    if weights is not None:
        ckpt.check_weights_fit(model, weights, str(resumed_from),
                               hint="; resume with the model options of that run")
    elif options.init_from_dense is not None:
        dense_path = ckpt.resolve_checkpoint(Path(options.init_from_dense))
        dense_weights, meta, _ = ckpt.read_checkpoint(dense_path)
        if "model_config" not in meta:
            raise ckpt.CheckpointError(f"{dense_path} has no model config; was it written by flexmoe train?")
        dense_cfg = ModelConfig.from_dict(json.loads(meta["model_config"]))
        gen = torch.Generator().manual_seed(train_cfg.seed + 1)
        diversify_from_dense(model, dense_weights, dense_cfg, spawn, gen, str(dense_path))

    stream = WindowStream(train_tokens, model_cfg.seq_len, train_cfg.seed)
    per_rank = train_cfg.eval_batches * train_cfg.batch_size
    val_all = validation_windows(val_tokens, model_cfg.seq_len, per_rank * info.world_size)
    if len(val_all) < info.world_size:
        raise DataError(f"validation split has {len(val_all)} sequences, fewer than the {info.world_size} ranks")
    val_all = val_all[: len(val_all) // info.world_size * info.world_size]  # equal shares: EP forwards are collective
    val_mine = np.array_split(val_all, info.world_size)[info.rank]
    trainer = Trainer(model, model_cfg, train_cfg, stream, val_mine, run_dir, device, info, metrics=None,
                      progress=options.progress,
                      checkpoint_meta={"corpus": corpus.fingerprint(), "tokenizer": train_cfg.tokenizer},
                      cost_model=(saved_state or {}).get("placement_cost_model"))
    if saved_state is not None:
        try:
            trainer.load_state_dict(saved_state, weights, str(resumed_from))
        except ckpt.CheckpointError as err:
            raise _with_older(err, resumed_from.parent, resumed_from.name) from None
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            bad = ckpt.CheckpointError(f"checkpoint file {resumed_from / ckpt.STATE} is corrupt "
                                       f"({type(err).__name__}: {err})")
            raise _with_older(bad, resumed_from.parent, resumed_from.name) from None
    else:
        torch.manual_seed(rank_seed(train_cfg.seed, info.rank))
    if options.stop_at is not None and options.stop_at <= trainer.step:
        raise ValueError(f"--stop-at {options.stop_at} is not after the checkpoint step {trainer.step}")
    return Prepared(options, run_dir, info, device, model_cfg, train_cfg, corpus, tokenizer, train_tokens,
                    val_tokens, trainer, resumed_from, cache_hit, history)


def _build_model(model_cfg: ModelConfig, train_cfg: TrainConfig, info: DistInfo, device: torch.device) -> GPTMoE:
    """The GPT-MoE on ``device``; with ``expert_parallel`` its experts spread over the ranks."""
    if not train_cfg.expert_parallel or not model_cfg.is_moe:
        return GPTMoE(model_cfg).to(device)
    if info.world_size == 1:
        raise ValueError("--expert-parallel needs several processes: launch with torchrun --nproc-per-node N")
    slots = -(-model_cfg.num_experts // info.world_size) + train_cfg.spare_slots
    return GPTMoE(model_cfg, ep_group=dist.group.WORLD, slots_per_rank=slots).to(device)


def _encode(corpus: Corpus, tokenizer, cfg: TrainConfig, run_dir: Path):
    """Token arrays of both splits; a BPE encoding is cached in the run folder."""
    if tokenizer.kind == "byte":
        return tokenizer.encode_docs(corpus.train_docs), tokenizer.encode_docs(corpus.val_docs), False
    key = hashlib.sha256(f"{corpus.fingerprint()}|{tokenizer.vocab_size}".encode()).hexdigest()[:16]
    cache = run_dir / TOKEN_CACHE
    if cache.exists():
        with np.load(cache) as data:
            if str(data["key"]) == key:
                return data["train"], data["val"], True
    return tokenizer.encode_docs(corpus.train_docs), tokenizer.encode_docs(corpus.val_docs), False


def execute(prep: Prepared) -> dict:
    """Write the run folder, train, and return the summary record.

    Raises ``DivergenceError`` (non-finite step, with on_nonfinite="stop") or
    ``CheckpointWriteError`` (a checkpoint, after a summary record that says why the run stopped,
    or any other file of the run folder: a full disk)."""
    try:
        return _execute(prep)
    except OSError as err:
        what = err.filename or str(prep.run_dir)
        raise ckpt.CheckpointWriteError(ckpt.write_failure(prep.run_dir, what, err)) from None


def _execute(prep: Prepared) -> dict:
    trainer, info, run_dir = prep.trainer, prep.info, prep.run_dir
    trace = None
    error = None
    trainer.metrics = MetricsLog(run_dir, enabled=False)
    if info.is_main:
        try:
            trace = _write_run_folder(prep)
        except Exception as err:  # raised here alone, it would leave the others waiting below
            error = ckpt.write_failure(run_dir, getattr(err, "filename", None) or str(run_dir), err)
    error = main_rank_error(error, info)  # the others would wait for the main rank in the first collective
    if error is not None:
        raise ckpt.CheckpointWriteError(error)
    trainer.trace = trace
    try:
        summary = trainer.run(prep.options.stop_at)
    except (DivergenceError, ckpt.CheckpointWriteError) as err:
        if info.is_main:
            try:  # best effort: the run stops with ``err`` on every rank either way
                trainer.metrics.write({**trainer.summary(), "stopped": str(err), "run_dir": str(run_dir)})
                trainer.metrics.close()
            except OSError:
                pass
        raise
    finally:
        if trace is not None:  # a close can fail too (NFS reports deferred write errors there)
            trainer.main_write(trace.close, trace.path)
    summary["run_dir"] = str(run_dir)
    if info.is_main:
        trainer.main_write(trainer.metrics.write, trainer.metrics.path, summary)
        trainer.main_write(trainer.metrics.close, trainer.metrics.path)
    error = main_rank_error(trainer.write_error, info)
    if error is not None:
        raise ckpt.CheckpointWriteError(error)
    return summary


def _write_run_folder(prep: Prepared):
    """The main rank's files of a starting run (config, tokenizer, metrics, trace); returns the
    trace recorder (None for a dense model). Raises OSError on a failed write."""
    trainer, info, run_dir = prep.trainer, prep.info, prep.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clean_temporaries(run_dir)
    history = prep.history or {"preset": prep.options.preset}
    _write_json(run_dir / "config.json", {
        **history, "model": prep.model_cfg.to_dict(), "train": prep.train_cfg.to_dict(),
        "world_size": info.world_size, "corpus": {"root": prep.corpus.root, "fingerprint": prep.corpus.fingerprint(),
                                                  "train_files": len(prep.corpus.train_docs),
                                                  "val_files": len(prep.corpus.val_docs)},
    })
    prep.tokenizer.save(run_dir / TOKENIZER)
    if prep.tokenizer.kind == "bpe" and not prep.token_cache_hit:
        _save_token_cache(run_dir, prep)
    if prep.resumed_from is not None:
        truncate_metrics(run_dir, trainer.step)
        records = read_metrics(run_dir)
        trainer.history = last_per_step(records, "train")
        trainer.val_history = last_per_step(records, "val")
    else:  # a run killed before its first checkpoint starts again from scratch
        for stale in (run_dir / METRICS, *run_dir.glob("routing_trace*.jsonl")):
            stale.unlink(missing_ok=True)
    trainer.metrics = MetricsLog(run_dir)
    return _open_trace(run_dir, prep) if prep.model_cfg.is_moe else None


def _open_trace(run_dir: Path, prep: Prepared):
    from ..sim.trace import TraceRecorder

    meta = {"source": "flexmoe train", "moe_blocks": prep.model_cfg.moe_block_indices, "step": "0-based",
            "tokens_per_rank_step": prep.train_cfg.batch_size * prep.train_cfg.grad_accum * prep.model_cfg.seq_len}
    cfg = prep.model_cfg
    args = (prep.info.world_size, cfg.num_experts, len(cfg.moe_block_indices), meta)
    try:
        return TraceRecorder(run_dir / TRACE, *args)
    except ValueError:  # a resume on another world size: keep the old trace, start a new one
        return TraceRecorder(run_dir / f"routing_trace.w{prep.info.world_size}.jsonl", *args)


def _save_token_cache(run_dir: Path, prep: Prepared) -> None:
    key = hashlib.sha256(f"{prep.corpus.fingerprint()}|{prep.tokenizer.vocab_size}".encode()).hexdigest()[:16]
    tmp = run_dir / f".{TOKEN_CACHE}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, key=np.array(key), train=prep.train_tokens, val=prep.val_tokens)
    os.replace(tmp, run_dir / TOKEN_CACHE)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def summary_line(summary: dict) -> str:
    """The one line ``flexmoe train`` ends with."""
    parts = [f"flexmoe train: {'done' if summary['finished'] else 'stopped'} at step {summary['step']}",
             f"{_count(summary['tokens'])} tokens in {summary['elapsed_s']:.0f}s "
             f"({summary['tokens'] / max(summary['elapsed_s'], 1e-9):.0f} tokens/s)"]
    if summary.get("skipped_steps"):
        parts.append(f"{summary['skipped_steps']} non-finite steps skipped")
    if "train_loss_last" in summary:
        k = summary.get("train_loss_window", 1)
        window = "of the first / last step" if k == 1 else f"means of the first / last {k} steps"
        parts.append(f"train loss {summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f} ({window})")
    if "val_loss" in summary:
        parts.append(f"val loss {summary['val_loss_first']:.3f} -> {summary['val_loss']:.3f} "
                     f"(ppl {summary['val_ppl']:.2f})")
    parts.append(f"run: {summary['run_dir']} (see: flexmoe plot {summary['run_dir']})")
    return " | ".join(parts)


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
