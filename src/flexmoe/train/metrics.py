"""Run metrics: RUN/metrics.jsonl (one JSON record per line) and load statistics.

Records: {"kind": "train", "step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens",
"tokens_per_s", "balance", "balance_per_layer", "experts_per_token", "experts_per_token_per_layer",
"elapsed_s"} after each optimizer step (experts_per_token: dispatched (token, expert) pairs per
token, k for top-k, more in the dense phase of the DTS gate; a step skipped for a non-finite loss
or gradient has "skipped": why, and its losses only),
{"kind": "val", "step", "val_loss", "val_ppl", "expert_weight_cos", "expert_output_cos" (and
their "..._per_layer" lists; see ``flexmoe.train.similarity``)} after each evaluation, and one
{"kind": "summary", ...} at the end of a run ("stopped": why, when it ended with an error).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

METRICS = "metrics.jsonl"


def balance_ratio(counts_LE: np.ndarray) -> np.ndarray:
    """Max expert load / mean expert load per layer (1 = perfectly balanced)."""
    counts_LE = np.asarray(counts_LE, dtype=np.float64)
    mean_L = counts_LE.mean(axis=-1)
    return np.where(mean_L > 0, counts_LE.max(axis=-1) / np.maximum(mean_L, 1e-300), 1.0)


class MetricsLog:
    """Appends records to RUN/metrics.jsonl, each one whole or not at all.

    A record goes to the file in unbuffered writes; when one fails (a full disk), the file is cut
    back to its last complete record, so it never ends in a partial line that a later record
    would follow, and no half-written record stays buffered to reach the file later."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS
        self._file = open(self.path, "ab", buffering=0) if enabled else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            append_whole(self._file.fileno(), (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` to the file open (for appending) at ``fd``, or raise the OSError with the
    file cut back to its size before the call."""
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass  # the file keeps a partial last line, which read_metrics ignores
        raise


def read_metrics(run_dir: Path) -> list[dict]:
    """All records; a truncated last line (a killed run) is ignored."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after ``step`` (written by a run that died after its last checkpoint)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("kind") != "summary" and r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def last_per_step(records: list[dict], kind: str) -> list[dict]:
    """Records of one kind, the last one for each step, ordered by step."""
    by_step = {}
    for r in records:
        if r.get("kind") == kind:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]
