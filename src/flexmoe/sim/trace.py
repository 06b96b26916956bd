"""Routing traces: routed rows per (step, layer, source rank, expert), recorded during training or
generated, replayed by the simulator.

Legend: T steps, L layers, W source ranks, E experts.

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


def _read_header(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        header = json.loads(f.readline())
    if header.get("flexmoe_trace") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a flexmoe trace (version {FORMAT_VERSION})")
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
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 2} is not valid JSON")
        records.setdefault(int(rec["step"]), {})[int(rec["layer"])] = rec["counts"]
    steps = sorted(s for s, layers in records.items() if len(layers) == L)
    counts = np.zeros((len(steps), L, W, E), dtype=np.int64)
    for t, step in enumerate(steps):
        for layer, c in records[step].items():
            counts[t, layer] = np.asarray(c, dtype=np.int64).reshape(W, E)
    return RoutingTrace(counts, np.array(steps, dtype=np.int64), header.get("meta", {}))
