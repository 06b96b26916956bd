"""Every ```python block of README.md runs as written on a CPU-only install. Blocks that initialise
torch.distributed run under torchrun with 2 gloo processes, one launch per block (a script
initialises its process group once; re-initialising it in one process is not what a user does);
the others run here, each in a fresh namespace. The torchrun launches starve gloo's threads
(STARVED_INIT), which turns an exit-time abort that load causes now and then into a reliable one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
DISTRIBUTED = [i for i, code in enumerate(BLOCKS) if "init_process_group" in code]
LOCAL = [i for i in range(len(BLOCKS)) if i not in DISTRIBUTED]

def test_readme_has_local_and_distributed_blocks():
    assert len(LOCAL) >= 2 and len(DISTRIBUTED) >= 2


@pytest.mark.parametrize("index", LOCAL)
def test_readme_block_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__main__"})


# Run under stress: gloo's threads starved right after init (helpers.starve_gloo_threads), so a
# collective that leaves a tensor with gloo's worker aborts the script at exit (flexmoe.collectives).
STARVED_INIT = f"""import sys, torch.distributed
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import helpers
_init = torch.distributed.init_process_group
def _starved_init(*args, **kwargs):
    _init(*args, **kwargs)
    helpers.starve_gloo_threads()
torch.distributed.init_process_group = _starved_init
"""


@pytest.mark.parametrize("index", DISTRIBUTED)
def test_readme_distributed_block_runs_under_torchrun(index, tmp_path):
    path = tmp_path / f"readme_block_{index}.py"
    path.write_text(STARVED_INIT + BLOCKS[index])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, f"README block {index} failed under torchrun:\n{done.stderr[-4000:]}"
