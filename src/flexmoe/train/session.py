"""One ``flexmoe train`` run: resolve configs, check every input, then train.

``prepare`` reads and validates everything (configs, data, tokenizer, checkpoints) and writes
nothing, so a bad data path or checkpoint leaves the run folder as it was; ``execute`` writes.
Config precedence: preset < the checkpoint's saved configs (on --resume) < explicit options.
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
from .config import PRESETS, TrainConfig
from .data import Corpus, DataError, WindowStream, load_corpus, validation_windows
from .diversify import DiversifyConfig, diversify_from_dense
from .distributed import DistInfo, rank_seed
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
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
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
    return (run_dir / METRICS).exists() or bool(ckpt.list_checkpoints(run_dir))


def prepare(options: RunOptions, info: DistInfo | None = None) -> Prepared:
    """Validate everything and build the trainer; writes nothing."""
    info = info or DistInfo()
    spawn = DiversifyConfig(options.diversify_noise, options.diversify_mask)
    saved_state = weights = None
    resumed_from = None
    if options.resume is not None:
        if options.resume == "latest":
            if options.run_dir is None:
                raise ValueError("--resume needs --run-dir (or --resume PATH to a run or checkpoint folder)")
            resumed_from = ckpt.resolve_checkpoint(Path(options.run_dir))
        else:
            resumed_from = ckpt.resolve_checkpoint(Path(options.resume))
        weights, _, saved_state = ckpt.read_checkpoint(resumed_from)
        run_dir = Path(options.run_dir) if options.run_dir else resumed_from.parent.parent
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(options.run_dir) if options.run_dir else Path("runs") / f"{options.preset}-{stamp}"
        if _holds_run(run_dir):
            raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or pick another --run-dir")
    try:
        model_cfg, train_cfg = _resolve_configs(options, saved_state)
    except TypeError as err:
        raise ValueError(f"bad configuration: {err}") from None
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
        trainer.load_state_dict(saved_state, weights, str(resumed_from))
    else:
        torch.manual_seed(rank_seed(train_cfg.seed, info.rank))
    if options.stop_at is not None and options.stop_at <= trainer.step:
        raise ValueError(f"--stop-at {options.stop_at} is not after the checkpoint step {trainer.step}")
    return Prepared(options, run_dir, info, device, model_cfg, train_cfg, corpus, tokenizer, train_tokens,
                    val_tokens, trainer, resumed_from, cache_hit)


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
    """Write the run folder, train, and return the summary record."""
    trainer, info, run_dir = prep.trainer, prep.info, prep.run_dir
    trace = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "config.json", {
            "preset": prep.options.preset, "model": prep.model_cfg.to_dict(), "train": prep.train_cfg.to_dict(),
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
        trainer.metrics = MetricsLog(run_dir)
        if prep.model_cfg.is_moe:
            trace = _open_trace(run_dir, prep)
    else:
        trainer.metrics = MetricsLog(run_dir, enabled=False)
    trainer.trace = trace
    try:
        summary = trainer.run(prep.options.stop_at)
    finally:
        if trace is not None:
            trace.close()
    summary["run_dir"] = str(run_dir)
    if info.is_main:
        trainer.metrics.write(summary)
        trainer.metrics.close()
    return summary


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
    if "train_loss_last" in summary:
        parts.append(f"train loss {summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f}")
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
