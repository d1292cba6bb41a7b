"""Crash safety: a rank killed with SIGKILL mid-job leaves no checkpoint that looks complete, the
others stop instead of hanging, a rerun with --overwrite completes and verifies, and the source's
bytes never change."""

import time

import pytest

from util import torchrun, tree_hash


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash") / "src"
    proc = torchrun(2, "make_source.py", "--preset", "gpt2", "--save", root, "--train-steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("point", ["read", "write"])
def test_killed_rank_leaves_no_complete_checkpoint_and_rerun_recovers(source, tmp_path, point):
    before = tree_hash(source)
    dst = tmp_path / "wide"
    t0 = time.time()
    crashed = torchrun(2, "expand_sharded.py", "--load", source, "--save", dst, "--tp", "2", "--timeout-minutes", "1",
                       env={"MEGACLONE_FAULT_INJECT": f"{point}:1"})
    assert crashed.returncode != 0
    assert time.time() - t0 < 300, "surviving ranks hung"
    assert "Signals.SIGKILL" in crashed.stderr or "SIGKILL" in crashed.stderr or "exitcode  : -9" in crashed.stderr
    assert not (dst / "latest_checkpointed_iteration.txt").exists()
    if point == "read":
        assert not any(dst.iterdir()), "nothing is written before the save"
    else:
        assert list(dst.rglob("*.distcp")), "the crash should come after shards were written"
        refused = torchrun(2, "expand_sharded.py", "--load", source, "--save", dst, "--tp", "2")
        # torchrun exits 1 when a rank fails; the rank's own status (2: bad input) is in its report
        assert refused.returncode == 1 and "exitcode  : 2" in refused.stderr
        assert "is not empty" in refused.stderr and "pass --overwrite" in refused.stderr

    rerun = torchrun(2, "expand_sharded.py", "--load", source, "--save", dst, "--tp", "2", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "0"
    ok = torchrun(2, "verify_logits.py", "--src", source, "--dst", dst)
    assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stdout[-2000:]
    assert tree_hash(source) == before
