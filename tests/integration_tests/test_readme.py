"""The README's commands run as written, in order, on a fresh directory.

Every ```bash block of README.md is run as one bash script from the repository root, with ``runs/``
pointed at a temporary directory (``OUT_DIR`` for the quickstart, the path itself elsewhere). Only
the environment steps are left out: ``pip install`` (this environment is installed already) and the
test suite itself (this test is part of it). A block fails the test if it exits non-zero; a block
that verifies must print PASS; a block that trains a clone must print the trainer's first-batch
check within tolerance (the clone grown in width and depth starts from the source model's loss).
"""

import re
import time

import pytest
from util import ROOT, run

pytestmark = pytest.mark.slow

FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def readme_blocks() -> list[str]:
    return FENCE.findall((ROOT / "README.md").read_text())


def runnable(block: str, runs: str) -> str:
    """The block as this test runs it: environment steps dropped, ``runs/`` moved to ``runs``."""
    steps = []
    for line in block.replace("\\\n", " ").splitlines():
        parts = [p.strip() for p in line.split("&&")]
        parts = [p for p in parts if not p.startswith("pip install") and "-m pytest" not in p]
        if parts and any(p and not p.startswith("#") for p in parts):
            steps.append(" && ".join(parts))
    return "set -euo pipefail\n" + "\n".join(steps).replace("runs/", f"{runs}/")


def test_the_readme_has_the_blocks_this_test_walks():
    blocks = readme_blocks()
    assert len(blocks) >= 4 and "bash examples/quickstart.sh" in blocks[0], blocks[:1]


def test_every_readme_command_runs_as_written(tmp_path):
    runs = str(tmp_path / "runs")
    for block in readme_blocks():
        script = runnable(block, runs)
        t0 = time.time()
        proc = run(["bash", "-c", script], env={"OUT_DIR": runs}, timeout=900)
        lines = script.splitlines()[1:] or ["(nothing to run)"]
        print(f"{time.time() - t0:6.1f} s  {lines[0][:100]}")
        shown = f"{script}\n--- exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        assert proc.returncode == 0, shown
        if "verify_logits.py" in block or "quickstart.sh" in block:
            assert "PASS" in proc.stdout, shown
        if "--finetune" in block:  # a clone trains from its source's loss (the trainer's own check)
            assert "within the fp32 tolerance" in proc.stdout, shown
