"""The layer's forward + backward time under each routing option, against today's default config.

One training step per call: gradients set to None, forward on ``[4, T/4, D]`` (sequences, for the
sequence-wise loss), loss = output . fixed random gradient + ``flexmoe.aux_loss(layer)``,
backward, then ``flexmoe.runtime.update_router_bias`` (a no-op without a balancing bias). Every
case has the default's weights (same seed). The default is timed before every case and the ratio
uses the mean of the two defaults around it, so slow drift of the device clock cancels; the
spread of the defaults is printed as the noise floor. "free" marks the options that should cost
nothing measurable (target: ratio <= 1.02); capacity drops change the work (kept rows printed).
Device- and node-limited routing only act under expert parallelism (multi-GPU benchmark).

The "host syncs / step" column counts the synchronising CUDA calls of one step (torch's sync
debug mode): a host read of a device value stops the host from queueing kernels ahead, and with
back-to-back steps the device then idles while the host catches up. ``--profile`` adds one table
per shape that splits each option's extra time into kernel time (the kernels whose time changed
most, by name) and time outside kernels (host syncs, launch gaps).

GPU:  python benchmarks/routing_options.py        --quick: Qwen3-like only
      python benchmarks/routing_options.py --short --profile   every shape and option, ~2-3 min
CPU smoke check:  python benchmarks/routing_options.py --tiny [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import socket
import statistics
import sys
import traceback
import warnings

import torch
import torch.distributed as dist

import flexmoe
from flexmoe.runtime import update_router_bias
from layer import SHAPES, header, timed

TINY = {"tiny": (64, 32, 16, 4)}
# label, MoEConfig overrides, should be free (the default has no router loss: the balance-loss
# rows include computing one; compare them with "aux loss 0.01 (batch)" too).
CASES = [
    ("router sigmoid", dict(router="sigmoid"), True),
    ("group-limited (8 groups, top 4)", dict(num_groups=8, top_groups=4), True),
    ("group-limited, group score = max (V2)", dict(num_groups=8, top_groups=4, group_score_experts=1), True),
    ("routed scaling 2.5", dict(routed_scaling_factor=2.5), True),
    ("balancing bias, softmax", dict(bias_update_rate=1e-3), True),
    ("balancing bias, sigmoid", dict(router="sigmoid", bias_update_rate=1e-3), True),
    ("sigmoid + groups + bias + scaling (DeepSeek-V3)",
     dict(router="sigmoid", num_groups=8, top_groups=4, bias_update_rate=1e-3, routed_scaling_factor=2.5), True),
    ("router bias", dict(router_bias=True), True),
    ("router jitter 0.01", dict(router_jitter=0.01), True),
    ("z-loss 1e-3", dict(z_loss_coef=1e-3), True),
    ("aux loss 0.01 (batch)", dict(aux_loss_coef=0.01), True),
    ("aux loss 0.01, unbiased experts", dict(aux_loss_coef=0.01, aux_loss_experts="unbiased", bias_update_rate=1e-3), True),
    ("aux loss 0.01, sequence-wise", dict(aux_loss_coef=0.01, aux_loss_scope="sequence"), True),
    ("aux loss 0.01, global batch", dict(aux_loss_coef=0.01, aux_loss_scope="global"), True),
    ("aux loss 0.01, pooled (HF)", dict(aux_loss_coef=0.01, aux_loss_scope="pooled"), True),
    ("capacity 1.25, priority prob", dict(capacity_factor=1.25), False),
    ("capacity 1.25, priority weight", dict(capacity_factor=1.25, capacity_priority="weight"), False),
    ("capacity 1.25, priority position", dict(capacity_factor=1.25, capacity_priority="position"), False),
    ("capacity 1.0 (exact integer)", dict(capacity_factor=1.0), False),
    ("expert biases", dict(expert_biases=True), False),
    ("clamped SwiGLU (GPT-OSS) + expert biases", dict(activation="swiglu_clamped", expert_biases=True), False),
]
CASE_FIELDS = {f.name for f in dataclasses.fields(flexmoe.MoEConfig)}


def step_fn(layer: flexmoe.MoELayer, x_BSD: torch.Tensor):
    """One training step of ``layer`` as a callable (see the module docstring)."""
    grad = torch.randn_like(x_BSD)
    x = x_BSD.detach().requires_grad_(True)
    params = list(layer.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        loss = (layer(x) * grad).sum() + flexmoe.aux_loss(layer)
        loss.backward()
        update_router_bias(layer)

    return step


def make_layer(D: int, F: int, E: int, k: int, device, kernels: str, base: flexmoe.MoELayer | None = None,
               **overrides) -> flexmoe.MoELayer:
    """The layer of ``overrides``, built on ``device`` (a Qwen3-like layer has 600M parameters:
    drawing them on the host took most of a run), with ``base``'s weights where it has them."""
    cfg = flexmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, validate_inputs=False, kernels=kernels,
                            **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        layer = flexmoe.MoELayer(cfg)
    layer = layer.to(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if base is not None:
        layer.load_state_dict(base.state_dict(), strict=False)  # extra parameters (biases) keep their init
    return layer


def host_syncs(step, device: torch.device) -> int | str:
    """Synchronising CUDA calls in one call of ``step`` (torch's sync debug mode); "-" off CUDA,
    the error's name when counting fails (the timing row is printed either way)."""
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    except Exception as exc:  # noqa: BLE001
        return f"count failed: {type(exc).__name__}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def kernel_us(step, device: torch.device, calls: int) -> dict[str, float]:
    """Self time per kernel name in microseconds per call of ``step``, from the torch profiler
    (CUDA kernels on a GPU; aten ops' self CPU time on the CPU smoke check)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            step()
        if cuda:
            torch.cuda.synchronize()
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    return {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / calls
            for e in prof.key_averages() if e.device_type == kind}


def kernel_diff_row(label: str, ms: float, ref_ms: float, syncs, us: dict, base_us: dict, top: int) -> str:
    """One row of the profile table: where ``label``'s step time differs from the default's."""
    names = set(us) | set(base_us)
    diff = {n: us.get(n, 0.0) - base_us.get(n, 0.0) for n in names}
    kernels = sum(diff.values()) / 1e3
    step = ms - ref_ms
    biggest = sorted(diff.items(), key=lambda item: -abs(item[1]))[:top]
    shown = "; ".join(f"{n[:48]} {d:+.0f} us" for n, d in biggest if abs(d) >= 1.0) or "none"
    return (f"| {label} | {step:+.3f} | {kernels:+.3f} | {step - kernels:+.3f} | {syncs} "
            f"| {shown} |")


def run_shape(name: str, D: int, F: int, E: int, k: int, args, device) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(1)
    x = torch.randn(4, args.tokens // 4, D, device=device, dtype=dtype)
    base_layer = make_layer(D, F, E, k, device, args.kernels)
    base_step = step_fn(base_layer, x)
    defaults: list[float] = []

    def default_ms() -> float:
        defaults.append(timed(base_step, args.reps, device, trials=args.trials))
        return defaults[-1]

    profile_rows: list[str] = []
    print(f"\n## {name} (D={D}, F={F}, E={E}, k={k}), T={args.tokens}, {str(dtype)[6:]}, kernels={args.kernels!r}, "
          f"{args.reps} calls x {args.trials} trials")
    print("| option | fields | free | ms | default ms (mean of the two around it) | ratio | kept rows "
          "| host syncs / step (default: {}) | target |".format(host_syncs(base_step, device)))
    print("|---|---|---|---|---|---|---|---|---|")
    before = default_ms()
    try:  # the tables so far are printed even when a time limit interrupts the run (SIGINT)
        for label, overrides, free in CASES:
            unknown = set(overrides) - CASE_FIELDS
            fields = ", ".join(f"{k_}={v!r}" for k_, v in overrides.items())
            if unknown:
                print(f"| {label} | {fields} | | skipped: this checkout has no {sorted(unknown)} | | | | | |")
                continue
            try:
                layer = make_layer(D, F, E, k, device, args.kernels, base_layer, **overrides)
                step = step_fn(layer, x)
                ms = timed(step, args.reps, device, trials=args.trials)
                kept = float(layer.last_counts.sum()) / (args.tokens * k)
                syncs = host_syncs(step, device)
                after = default_ms()
                ref = (before + after) / 2
                before = after
                ratio = ms / ref
                target = ("ok" if ratio <= 1.02 else "SLOWER") if free else "-"
                print(f"| {label} | {fields} | {'yes' if free else 'no'} | {ms:.3f} | {ref:.3f} | {ratio:.3f} "
                      f"| {kept:.3f} | {syncs} | {target} |", flush=True)
                if args.profile:
                    us = kernel_us(step, device, args.profile_calls)
                    base_us = kernel_us(base_step, device, args.profile_calls)  # profiled next to each option
                    profile_rows.append(kernel_diff_row(label, ms, ref, syncs, us, base_us, args.top))
                del layer, step
            except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
                msg = str(exc).splitlines()[0][:160] if str(exc) else ""
                print(f"| {label} | {fields} | | FAILED: {type(exc).__name__}: {msg} | | | | | |", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        spread = (max(defaults) - min(defaults)) / statistics.median(defaults)
        print(f"default timed {len(defaults)} times: median {statistics.median(defaults):.3f} ms, "
              f"spread (max - min) / median {spread:.1%}")
        if args.profile:
            what = "CUDA kernel" if device.type == "cuda" else "aten op (CPU self time)"
            print(f"\n### {name}: where each option's step differs from the default's ({what} times from the torch "
                  f"profiler, {args.profile_calls} calls each; 'outside kernels' = step difference - kernel "
                  "difference: host work and host syncs the device waits for)")
            print(f"| option | step ms vs default | kernels ms vs default | outside kernels ms | host syncs / step "
                  f"| top {args.top} {what}s by time difference per step |")
            print("|---|---|---|---|---|---|")
            for row in profile_rows:
                print(row)


def one_process_group(device: torch.device) -> None:
    """A world-size-1 process group (the global-batch balance loss all-reduces its counts)."""
    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, timeout=datetime.timedelta(minutes=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen3-30b-a3b,olmoe", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=10, help="calls per timed trial (5 trials)")
    parser.add_argument("--kernels", default="auto", help="MoEConfig.kernels of every case")
    parser.add_argument("--trials", type=int, default=5, help="timed trials (the median is kept)")
    parser.add_argument("--quick", action="store_true", help="Qwen3-like only, 5 calls per trial")
    parser.add_argument("--short", action="store_true",
                        help="every shape and option, 4 calls x 3 trials (about 2 minutes on an H200)")
    parser.add_argument("--profile", action="store_true",
                        help="also one table per shape: each option's kernel times against the default's")
    parser.add_argument("--profile-calls", type=int, default=3, help="profiled calls per option")
    parser.add_argument("--top", type=int, default=3, help="kernels named per option in the profile table")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check, tiny shape")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    if args.quick:
        shapes, args.reps = {"qwen3-30b-a3b": SHAPES["qwen3-30b-a3b"]}, 5
    if args.short:
        args.reps, args.trials = 4, 3
    if args.tiny:
        shapes, args.tokens, args.reps, args.trials = TINY, 256, 1, 3
    print(header(device))
    one_process_group(device)
    for name, (D, F, E, k) in shapes.items():
        try:
            run_shape(name, D, F, E, k, args, device)
        except Exception:  # noqa: BLE001
            print(f"\n## {name}: FAILED")
            traceback.print_exc(file=sys.stdout)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
