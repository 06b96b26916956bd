"""Routing traces: routed rows per (step, layer, source rank, expert), recorded during training or
generated, replayed by the simulator.

Legend: T steps, L layers, W source ranks, E experts, k virtual ranks per recorded rank.

File format (JSON Lines, UTF-8, appendable, one record per line):

    {"flexmoe_trace": 1, "world_size": W, "num_experts": E, "num_layers": L, "meta": {...}}
    {"step": 0, "layer": 0, "counts": [[c_00, ..., c_0E-1], ..., [c_W-10, ...]]}
    ...

The first line is the header; every other line holds ``counts[w][e]`` of one (step, layer).
Appending to an existing file checks that its header matches. A reader ignores a truncated last
line (a run killed mid-write; appending cuts it first), and keeps only steps that have every layer.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

import numpy as np

FORMAT_VERSION = 1


@dataclasses.dataclass
class RoutingTrace:
    """counts_TLWE[t, l, w, e]: rows source rank w routed to expert e in layer l at ``steps_T[t]``."""

    counts_TLWE: np.ndarray
    steps_T: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts_TLWE = np.asarray(self.counts_TLWE, dtype=np.int64)
        self.steps_T = np.asarray(self.steps_T, dtype=np.int64)
        if self.counts_TLWE.ndim != 4:
            raise ValueError(f"counts_TLWE must be 4-d [steps, layers, ranks, experts], got {self.counts_TLWE.shape}")
        if self.steps_T.shape != self.counts_TLWE.shape[:1]:
            raise ValueError(f"steps_T {self.steps_T.shape} must match counts_TLWE steps {self.counts_TLWE.shape[0]}")
        if (self.counts_TLWE < 0).any():
            raise ValueError("counts must be >= 0")

    @property
    def num_steps(self) -> int:
        return self.counts_TLWE.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts_TLWE.shape[1]

    @property
    def world_size(self) -> int:
        return self.counts_TLWE.shape[2]

    @property
    def num_experts(self) -> int:
        return self.counts_TLWE.shape[3]

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole trace (replacing ``path``)."""
        with TraceRecorder(path, self.world_size, self.num_experts, self.num_layers, self.meta, append=False) as rec:
            for t, step in enumerate(self.steps_T):
                for layer in range(self.num_layers):
                    rec.record(int(step), layer, self.counts_TLWE[t, layer])


class TraceRecorder:
    """Appends routing counts to a trace file; call ``record`` once per (step, layer).

    Only one process should write (e.g. rank 0 after all-gathering the counts). Each record is
    flushed, so the file stays readable when training stops abruptly.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        world_size: int,
        num_experts: int,
        num_layers: int,
        meta: dict | None = None,
        append: bool = True,
    ):
        for name, value in (("world_size", world_size), ("num_experts", num_experts), ("num_layers", num_layers)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value}")
        self.path = os.fspath(path)
        self.world_size, self.num_experts, self.num_layers = int(world_size), int(num_experts), int(num_layers)
        header = {"flexmoe_trace": FORMAT_VERSION, "world_size": self.world_size,
                  "num_experts": self.num_experts, "num_layers": self.num_layers, "meta": meta or {}}
        exists = append and os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if exists:
            old = _read_header(self.path)
            for key in ("world_size", "num_experts", "num_layers"):
                if old[key] != header[key]:
                    raise ValueError(f"cannot append: {self.path} has {key}={old[key]}, recorder has {header[key]}")
            _drop_partial_last_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")
            self._file.write(json.dumps(header) + "\n")
        self._file.flush()

    def record(self, step: int, layer: int, counts_WE) -> None:
        counts_WE = np.asarray(counts_WE)
        if counts_WE.shape != (self.world_size, self.num_experts):
            raise ValueError(f"counts_WE must have shape {(self.world_size, self.num_experts)}, got {counts_WE.shape}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if (counts_WE < 0).any() or not np.array_equal(counts_WE, np.rint(counts_WE)):
            raise ValueError("counts must be non-negative integers")
        line = {"step": int(step), "layer": int(layer), "counts": counts_WE.astype(np.int64).tolist()}
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TraceError(ValueError):
    """A file that is missing or is not a flexmoe routing trace."""


def _not_a_trace(path: str, why: str) -> TraceError:
    return TraceError(f"{path} is not a flexmoe trace (format {FORMAT_VERSION}): {why}")


def _open_text(path: str):
    """A trace file for reading; a ``.gz`` one (committed traces are compressed) decompressed."""
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _read_header(path: str) -> dict:
    if not os.path.isfile(path):
        raise TraceError(f"trace file {path} does not exist")
    try:
        with _open_text(path) as f:
            header = json.loads(f.readline())
    except (UnicodeDecodeError, json.JSONDecodeError, gzip.BadGzipFile, EOFError):
        raise _not_a_trace(path, "its first line is not a JSON header") from None
    if not isinstance(header, dict) or header.get("flexmoe_trace") != FORMAT_VERSION:
        raise _not_a_trace(path, 'its header lacks "flexmoe_trace": 1')
    for key in ("world_size", "num_experts", "num_layers"):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _not_a_trace(path, f"header field {key!r} must be an int >= 1, got {value!r}")
    if not isinstance(header.get("meta", {}), dict):
        raise _not_a_trace(path, 'header field "meta" must be an object')
    return header


def _drop_partial_last_line(path: str) -> None:
    """Cut a last line that lacks its newline (a write interrupted by a crash)."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_trace(path: str | os.PathLike) -> RoutingTrace:
    """Load a trace file; a later record of the same (step, layer) replaces an earlier one."""
    path = os.fspath(path)
    header = _read_header(path)
    W, E, L = header["world_size"], header["num_experts"], header["num_layers"]
    records: dict[int, dict[int, list]] = {}
    try:
        with _open_text(path) as f:
            lines = f.read().split("\n")[1:]
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        raise _not_a_trace(path, "it is not UTF-8 text") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise TraceError(f"{path}: line {i + 2} is not valid JSON") from None
        step, layer, counts_WE = _record_fields(path, i + 2, rec, W, E, L)
        records.setdefault(step, {})[layer] = counts_WE
    steps = sorted(s for s, layers in records.items() if len(layers) == L)
    counts = np.zeros((len(steps), L, W, E), dtype=np.int64)
    for t, step in enumerate(steps):
        for layer, c in records[step].items():
            counts[t, layer] = c
    return RoutingTrace(counts, np.array(steps, dtype=np.int64), header.get("meta", {}))


def _record_fields(path: str, line_no: int, rec, W: int, E: int, L: int) -> tuple[int, int, np.ndarray]:
    """(step, layer, counts_WE) of one record, or a ``TraceError`` naming the line."""
    where = f"{path}: line {line_no}"
    if not isinstance(rec, dict) or not all(k in rec for k in ("step", "layer", "counts")):
        raise TraceError(f'{where} is not a record with "step", "layer" and "counts"')
    step, layer = rec["step"], rec["layer"]
    for name, value in (("step", step), ("layer", layer)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TraceError(f"{where}: {name} must be an int >= 0, got {value!r}")
    if layer >= L:
        raise TraceError(f"{where}: layer {layer} is not below the header's num_layers={L}")
    try:
        counts_WE = np.asarray(rec["counts"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise TraceError(f"{where}: counts must be a [world_size][num_experts] array of integers") from None
    if counts_WE.shape != (W, E) or (counts_WE < 0).any():
        raise TraceError(f"{where}: counts must be {W} x {E} non-negative integers, got shape {counts_WE.shape}")
    return step, layer, counts_WE


def deal_to_ranks(counts_TLWE: np.ndarray, world_size: int) -> np.ndarray:
    """Counts of ``world_size`` virtual source ranks from a trace of fewer (a divisor of it).

    Each recorded rank's rows, ordered by expert, are dealt round-robin to its
    ``world_size / W`` virtual ranks (row i to virtual rank i mod k), so every virtual rank gets
    the same expert mix and its total differs from the others' by at most one row: this models
    expert load over more ranks, not where tokens come from.
    """
    T, L, W, E = counts_TLWE.shape
    if world_size % W:
        raise ValueError(f"world_size={world_size} must be a multiple of the trace's {W} ranks")
    k = world_size // W
    end_TLWE = np.cumsum(counts_TLWE, axis=-1)
    start_TLWE = end_TLWE - counts_TLWE
    dealt_TLWKE = _rows_below(end_TLWE, k) - _rows_below(start_TLWE, k)
    return dealt_TLWKE.reshape(T, L, world_size, E)


def _rows_below(x_TLWE: np.ndarray, k: int) -> np.ndarray:
    """[T, L, W, k, E]: how many rows i < x have i % k == j, i.e. max(ceil((x - j) / k), 0)."""
    j_K1 = np.arange(k).reshape(k, 1)
    return np.maximum(-((j_K1 - x_TLWE[..., None, :]) // k), 0)
