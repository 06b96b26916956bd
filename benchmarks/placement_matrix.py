"""Placement planners on routing traces in parallel: one task per (trace, variant, layer), by multiprocessing.

Modelled time, not measured (numpy, CPU; no GPU, no torch): the cost model, traces, planners and
policy of ``placement_sim.py`` (H100 rates, Qwen3-like experts, adaptive split, ``ReplanPolicy()``),
every trace replayed at world size 8 with S = ceil(E / 8) + 2 slots per rank. With no bytes budget
the layers are independent, so a layer's task gives the times a full run gives that layer
(``--check`` verifies it) and the tables reproduce ``placement_sim.py``'s figures per layer.

    python benchmarks/placement_matrix.py --jobs 16 --json out.json       # all traces, all variants
    python benchmarks/placement_matrix.py --traces cpu_aux001 --variants static,greedy
    python benchmarks/placement_matrix.py --tiny --jobs 2 --json /tmp/m.json   # 40 steps: a smoke check
    python benchmarks/placement_matrix.py --check          # per-layer tasks == full multi-layer runs
    python benchmarks/placement_matrix.py --save-counts c.npz   # here; then elsewhere: --counts c.npz

The synthetic trace and the rank split draw from numpy's generators, whose streams differ between
numpy versions: to compare with figures made here, replay the counts saved here (``--counts``).

Variants: static; greedy (default policy); shedK (greedy with ``ReplanPolicy(shed_window=K)``,
e.g. shed2); greedy@field=value;field=value (other ``ReplanPolicy`` fields, e.g.
"greedy@warmup=20;shed_window=9"); perfect (greedy planned on the true counts of the interval it is kept, guard off,
noise z 0); oracle. Tasks run longest first (oracle first). ``--out`` gets one JSON line per task
as it finishes (a run cut short keeps what it did); ``--report FILE...`` prints the tables from
such files (several runs together).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"  # one thread per worker; set before numpy is imported

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from flexmoe.placement import CostModel, ReplanPolicy, make_planner
from flexmoe.sim import RoutingTrace, SimResult, SyntheticTraceConfig, generate_trace, read_trace
from flexmoe.sim.simulator import merge_ranks, simulate_planner, split_ranks

W = 8
TRACE_DIR = Path(__file__).resolve().parent / "traces"
# name -> (file in benchmarks/traces, None: synthetic; count scale; steps, None: all)
TRACES: dict[str, tuple[str | None, int, int | None]] = {
    "synthetic": (None, 1, 1000),
    "cpu_aux0": ("train_tiny_cpu_e64_top4_aux0.jsonl", 16, None),
    "cpu_aux001": ("train_tiny_cpu_e64_top4_aux001.jsonl", 16, None),
    "h200_aux001": ("gpu_small_e64_top4.jsonl.gz", 1, 300),
    "h200_aux0": ("gpu_small_e64_top4_aux0.jsonl.gz", 1, 300),
    "h200_bias": ("gpu_small_e64_top4_bias.jsonl.gz", 1, 300),
}
VARIANTS = ["static", "greedy", "shed2", "perfect", "oracle"]  # the default set; any shedK is accepted


def cost_model() -> CostModel:
    return CostModel.from_shape(2048, 768, flops=764e12, mem_bw=3.0e12, a2a_bw=350e9)


def load_counts(name: str, steps: int | None = None) -> np.ndarray:
    """counts_TLWE of trace ``name`` at W ranks, loaded as placement_sim.py does (steps, then scale,
    then ranks split or merged as ``simulate()`` does)."""
    file, scale, default_steps = TRACES[name]
    steps = steps or default_steps
    if file is None:
        trace = generate_trace(SyntheticTraceConfig(num_steps=steps, world_size=W, num_experts=64,
                                                    tokens_per_rank=16384, top_k=8, alpha=1.0, seed=0))
    else:
        trace = read_trace(TRACE_DIR / file)
        trace = RoutingTrace(trace.counts_TLWE[:steps] * scale, trace.steps_T[:steps], trace.meta)
    counts_TLWE = trace.counts_TLWE
    if W < trace.world_size:
        counts_TLWE = merge_ranks(counts_TLWE, W)
    elif W > trace.world_size:
        counts_TLWE = split_ranks(counts_TLWE, W)
    return counts_TLWE


def policy_changes(variant: str) -> dict | None:
    """The ``ReplanPolicy`` fields of a greedy variant: "shedK" is shed_window=K, and
    "greedy@field=value;field=value" sets those fields (None for the other variants)."""
    if variant.startswith("shed") and variant[4:].isdigit():
        return {"shed_window": int(variant[4:])}
    if not variant.startswith("greedy@"):
        return None
    changes = {}
    for item in variant[len("greedy@"):].split(";"):
        name, _, value = item.partition("=")
        changes[name] = None if value == "None" else float(value) if "." in value else int(value)
    return changes


def known(variant: str) -> bool:
    return variant in VARIANTS or policy_changes(variant) is not None


def run_variant(variant: str, counts_TLWE: np.ndarray) -> SimResult:
    policy, planner, perfect = ReplanPolicy(), make_planner("greedy"), False
    if policy_changes(variant) is not None:
        policy = dataclasses.replace(policy, **policy_changes(variant))
    elif variant in ("static", "oracle"):
        planner = make_planner(variant)
    elif variant == "perfect":
        policy, perfect = dataclasses.replace(policy, guard=False, noise_z=0.0, shed_window=None), True
    elif variant != "greedy":
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    S = -(-counts_TLWE.shape[3] // W) + 2
    return simulate_planner(planner, counts_TLWE, cost_model(), S, policy, perfect_prediction=perfect)


def run_task(task: tuple[str, str, int, np.ndarray]) -> dict:
    """One layer of one trace under one variant: its per-step arrays and totals."""
    trace, variant, layer, counts_T1WE = task
    t0 = time.perf_counter()
    r = run_variant(variant, counts_T1WE)
    return {"trace": trace, "variant": variant, "layer": layer, "time_T": r.layer_time_TL[:, 0].tolist(),
            "balance_T": r.balance_TL[:, 0].tolist(), "bytes_moved": r.bytes_moved, "replans": r.replans,
            "share_updates": r.share_updates, "seconds": time.perf_counter() - t0,
            "experts": int(counts_T1WE.shape[3])}


def check() -> bool:
    """Full multi-layer runs against concatenated per-layer runs (cpu_aux001, 60 steps)."""
    counts_TLWE = load_counts("cpu_aux001", 60)
    ok = True
    for variant in ("static", "greedy", "shed2", "perfect"):
        full = run_variant(variant, counts_TLWE)
        parts = [run_variant(variant, counts_TLWE[:, [l]]) for l in range(counts_TLWE.shape[1])]
        time_TL = np.concatenate([p.layer_time_TL for p in parts], axis=1)
        balance_TL = np.concatenate([p.balance_TL for p in parts], axis=1)
        rel = float((np.abs(time_TL - full.layer_time_TL) / np.maximum(np.abs(full.layer_time_TL), 1e-300)).max())
        same = (np.allclose(time_TL, full.layer_time_TL, rtol=1e-12, atol=0)
                and np.allclose(balance_TL, full.balance_TL, rtol=1e-12, atol=0)
                and sum(p.replans for p in parts) == full.replans)
        print(f"check {variant}: {counts_TLWE.shape[:2]} steps x layers, max relative difference of layer time "
              f"{rel:.2e}, re-plans {full.replans} full vs {sum(p.replans for p in parts)} per layer: "
              f"{'ok' if same else 'MISMATCH'}", flush=True)
        ok &= same
    return ok


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b > 0 else "-"


def collect(rows: list[dict]) -> dict:
    """Task rows -> {trace: {variant: per-layer arrays and totals}} (complete variants only)."""
    out: dict = {}
    for row in rows:
        out.setdefault(row["trace"], {}).setdefault(row["variant"], {})[row["layer"]] = row
    for trace, by in out.items():
        layers = max(len(parts) for parts in by.values())
        for v, parts in list(by.items()):
            if len(parts) < layers:  # a run cut short: leave the variant out
                del by[v]
                continue
            rows_L = [parts[l] for l in range(layers)]
            by[v] = {"time_TL": np.stack([r["time_T"] for r in rows_L], 1),
                     "balance_TL": np.stack([r["balance_T"] for r in rows_L], 1),
                     **{k: sum(r[k] for r in rows_L) for k in ("bytes_moved", "replans", "share_updates")}}
    return out


def report(rows: list[dict]) -> None:
    """Per trace: variants against static (overall, worst layer, balance, bytes, re-plans) and per
    layer; then one summary table."""
    results = collect(rows)
    order = lambda v: (VARIANTS.index(v) if v in VARIANTS else 2, (policy_changes(v) or {}).get("shed_window") or 0)
    shown = sorted({v for by in results.values() for v in by}, key=order)
    planners = [v for v in shown if v != "static"]
    summary = ["| trace | static balance | " + " | ".join(planners) + " | "
               + " | ".join(f"{v} vs oracle" for v in planners if v not in ("oracle", "perfect")) + " |"]
    summary.append("|---|---|" + "---|" * (len(planners) + len([v for v in planners if v not in ("oracle", "perfect")])))
    for trace, by in results.items():
        if "static" not in by:
            continue
        base_L = by["static"]["time_TL"].sum(0)
        T, L = by["static"]["time_TL"].shape
        print(f"\n## {trace}: {T} steps x {L} layers, {W} ranks\n")
        print("| variant | vs static | worst layer | balance mean | GB moved | re-plans |\n|---|---|---|---|---|---|")
        for v in sorted(by, key=order):
            time_L = by[v]["time_TL"].sum(0)
            print(f"| {v} | {ratio(base_L.sum(), time_L.sum())} | {(base_L / time_L).min():.3f}x "
                  f"| {by[v]['balance_TL'].mean():.3f} | {by[v]['bytes_moved'] / 1e9:.1f} | {by[v]['replans']} |")
        print("\n| static / variant | " + " | ".join(f"layer {l}" for l in range(L)) + " |\n|---|" + "---|" * L)
        for v in sorted(by, key=order):
            print(f"| {v} | " + " | ".join(f"{x:.3f}x" for x in base_L / by[v]["time_TL"].sum(0)) + " |")
        cell = lambda v: (f"{ratio(base_L.sum(), by[v]['time_TL'].sum())} ({(base_L / by[v]['time_TL'].sum(0)).min():.3f}x)"
                          if v in by else "-")
        gap = lambda v: (f"{by[v]['time_TL'].sum() / by['oracle']['time_TL'].sum() - 1:+.1%}"
                         if v in by and "oracle" in by else "-")
        summary.append(f"| {trace} | {by['static']['balance_TL'].mean():.3f} | " + " | ".join(cell(v) for v in planners)
                       + " | " + " | ".join(gap(v) for v in planners if v not in ("oracle", "perfect")) + " |")
    print("\n## summary: static time / variant time (worst layer); planners vs the oracle\n")
    print("\n".join(summary))


def read_rows(paths: list[str]) -> list[dict]:
    return [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", default=",".join(TRACES), help=f"comma list of {list(TRACES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS} or shedK")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=None, help="truncate every trace (default: the table above)")
    parser.add_argument("--tiny", action="store_true", help="every trace truncated to 40 steps")
    parser.add_argument("--out", default=None, help="append one JSON line per finished task here")
    parser.add_argument("--report", nargs="+", default=None, metavar="FILE", help="print the tables of these --out files")
    parser.add_argument("--check", action="store_true", help="verify per-layer tasks against full runs, then exit")
    parser.add_argument("--save-counts", default=None, metavar="NPZ",
                        help="write the traces' counts (as replayed) to this .npz and exit")
    parser.add_argument("--counts", default=None, metavar="NPZ",
                        help="replay the counts of a --save-counts file (the synthetic trace and the rank "
                             "split draw from numpy's generators, whose streams differ between numpy versions)")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check() else 1)
    if args.report:
        report(read_rows(args.report))
        return
    traces = [t.strip() for t in args.traces.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [t for t in traces if t not in TRACES] + [v for v in variants if not known(v)]
    if bad:
        parser.error(f"unknown {bad}: traces are {list(TRACES)}, variants {VARIANTS} or shedK")
    for v in (v for v in variants if policy_changes(v) is not None):  # a bad policy fails here, not in every worker
        try:
            ReplanPolicy(**policy_changes(v))
        except (ValueError, TypeError) as e:
            parser.error(f"{v}: {e}")
    steps = 40 if args.tiny else args.steps
    t0 = time.perf_counter()
    if args.counts:
        with np.load(args.counts) as saved:
            counts = {t: saved[t][:steps] for t in traces}
    else:
        counts = {t: load_counts(t, steps) for t in traces}
    if args.save_counts:
        np.savez_compressed(args.save_counts, **counts)
        print(f"wrote {args.save_counts}: " + ", ".join(f"{t} {c.shape} sum {int(c.sum())}" for t, c in counts.items()))
        return
    tasks = [(t, v, l, c[:, [l]]) for t, c in counts.items() for v in variants for l in range(c.shape[1])]
    tasks.sort(key=lambda k: (k[1] != "oracle", -k[3].shape[0], k[1] == "static"))  # longest first
    print(f"{len(tasks)} tasks on {args.jobs} processes; traces loaded ({time.perf_counter() - t0:.1f} s)", flush=True)
    rows: list[dict] = []
    with multiprocessing.Pool(min(args.jobs, len(tasks))) as pool:
        for row in pool.imap_unordered(run_task, tasks):
            rows.append(row)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"[{time.perf_counter() - t0:7.1f} s] {len(rows)}/{len(tasks)} {row['trace']} {row['variant']} "
                  f"layer {row['layer']} ({row['seconds']:.1f} s)", flush=True)
    report(rows)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
