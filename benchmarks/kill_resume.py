"""Fault injection: SIGKILL ``flexmoe train`` at random moments, resume, compare with an unkilled run.

Each trial starts the same small run in a fresh folder, kills it after a random delay (so kills
land in start-up, training steps, evaluation and checkpoint writes, which happen every step),
then continues it the way a user would: ``--resume``, or, when the run died before its first
checkpoint (``--resume`` says so), the same command again. Every continuation may be killed too.
A trial passes when the finished run's per-step losses equal the unkilled run's bit for bit and
no temporary file is left in the run folder. Prints one row per trial.

python benchmarks/kill_resume.py --trials 10 [--seed 0] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flexmoe.train.metrics import last_per_step, read_metrics

MODEL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32", "--num-experts", "4",
         "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "3", "--threads", "1",
         "--steps", "24", "--checkpoint-every", "1", "--eval-every", "6", "--quiet"]


def command(run_dir: Path, data: Path, device: str, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "flexmoe.cli", "train", "--run-dir", str(run_dir)]
    return base + ["--resume", "--quiet"] if resume else base + ["--data", str(data), "--device", device, *MODEL]


def run(cmd: list[str], kill_after: float | None) -> tuple[int, str]:
    """Exit status (-9 when killed) and stderr of one process, SIGKILLed after ``kill_after`` s."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    return proc.returncode, err


def losses(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    out = {("train", r["step"]): r["loss"] for r in last_per_step(records, "train")}
    out.update({("val", r["step"]): r["val_loss"] for r in last_per_step(records, "val")})
    return out


def leftovers(run_dir: Path) -> list[str]:
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*")]


def trial(root: Path, data: Path, device: str, rng: random.Random, duration: float) -> dict:
    run_dir = root / "run"
    kills, restarts, resume, history = 0, 0, False, []
    for attempt in range(8):
        delay = rng.uniform(0.2, duration) if attempt < 3 else None  # at most 3 kills per trial
        rc, err = run(command(run_dir, data, device, resume), delay)
        if rc == -signal.SIGKILL:
            kills += 1
            history.append(f"kill@{delay:.1f}s")
            resume = True
            continue
        if rc == 2 and ("holds no complete checkpoint" in err or "no checkpoint found" in err):
            restarts += 1
            history.append("restart")
            resume = False
            continue
        if rc == 2 and "the run finished at step" in err:  # killed after its summary record, while exiting
            history.append("finished")
            break
        if rc == 2 and "already holds a run" in err:
            resume = True
            continue
        if rc != 0:
            return {"kills": kills, "history": " ".join(history), "result": f"exit {rc}: {err.strip()[-200:]}"}
        break
    return {"kills": kills, "history": " ".join(history) or "-", "run_dir": run_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"  # a snapshot of the library's own source as the corpus
        shutil.copytree(Path(__file__).resolve().parent.parent / "src" / "flexmoe", data,
                        ignore=shutil.ignore_patterns("__pycache__"))
        tic = time.perf_counter()
        rc, err = run(command(tmp / "reference", data, args.device, False), None)
        duration = time.perf_counter() - tic
        if rc != 0:
            sys.exit(f"the unkilled run failed: {err}")
        reference = losses(tmp / "reference")
        print(f"unkilled run: {duration:.1f} s, {len(reference)} loss records; kills uniform in [0.2, {duration:.1f}] s")
        print(f"| trial | kills | what happened | losses equal | leftover temporaries |")
        print(f"|---|---|---|---|---|")
        passed = 0
        for i in range(args.trials):
            root = tmp / f"trial{i}"
            root.mkdir()
            out = trial(root, data, args.device, rng, duration)
            if "run_dir" in out:
                equal = losses(out["run_dir"]) == reference
                left = leftovers(out["run_dir"])
                passed += equal and not left
                print(f"| {i} | {out['kills']} | {out['history']} | {'yes' if equal else 'NO'} | {', '.join(left) or '-'} |")
            else:
                print(f"| {i} | {out['kills']} | {out['history']} | {out['result']} | ? |")
        print(f"{passed} of {args.trials} trials resumed to the unkilled run's losses with no leftovers")


if __name__ == "__main__":
    main()
