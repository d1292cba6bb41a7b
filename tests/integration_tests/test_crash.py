"""Crash safety: a rank killed with SIGKILL mid-job leaves no checkpoint that looks complete, the
others stop instead of hanging, a rerun with --overwrite completes and verifies, and the source's
bytes never change."""

import time
import uuid

import psutil
import pytest
from util import tmpfs, torchrun, tree_hash

pytestmark = pytest.mark.slow  # torchrun jobs


@pytest.fixture(scope="module")
def source(cli_source):
    return cli_source


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
        assert not dst.exists() or not any(dst.iterdir()), "nothing is written before the save"
        assert tree_hash(source) == before
        return  # the recovery below is the same for both points: run once, after the write crash
    assert list(dst.rglob("*.distcp")), "the crash should come after shards were written"
    refused = torchrun(2, "expand_sharded.py", "--load", source, "--save", dst, "--tp", "2")
    # torchrun exits 1 when a rank fails; the rank's own status (2: bad input) is in its report
    assert refused.returncode == 1 and "exitcode  : 2" in refused.stderr
    assert "is not empty" in refused.stderr and "pass --overwrite" in refused.stderr
    # the launcher's report repeats the refusal instead of pointing at torchrun's documentation
    assert refused.stderr.count("pass --overwrite") >= 2 and "To enable traceback" not in refused.stderr

    rerun = torchrun(2, "expand_sharded.py", "--load", source, "--save", dst, "--tp", "2", "--overwrite", "--verify")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert "PASS: 2 ranks" in rerun.stdout and "weights: PASS" in rerun.stdout, rerun.stdout[-2000:]
    assert tree_hash(source) == before


def _processes_tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``tag`` (every process a launch forks inherits it)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MEGACLONE_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_stopped_rank_becomes_an_error_on_every_other_rank_within_the_timeout(source, tmp_path):
    """SIGSTOP (a stuck filesystem, a frozen node): the peers' collectives time out after
    --timeout-minutes and say so in one line; the launcher then kills the stopped rank."""
    tag = uuid.uuid4().hex
    t0 = time.time()
    stuck = torchrun(2, "expand_sharded.py", "--load", source, "--save", tmp_path / "wide", "--tp", "2",
                     "--timeout-minutes", "0.1", env={"MEGACLONE_FAULT_INJECT": "stop-read:1", "MEGACLONE_TEST_TAG": tag})
    elapsed = time.time() - t0
    assert stuck.returncode != 0
    assert "error: rank 0: another process of this job died or stopped answering" in stuck.stderr
    assert "exitcode  : 3" in stuck.stderr  # the surviving rank's own status
    assert "traceback : error: rank 0: another process of this job died" in stuck.stderr
    # 6 s timeout + torchrun's 30 s grace (fixed) before SIGKILL of the stopped rank + start-up
    assert elapsed < 240, f"took {elapsed:.0f} s"
    time.sleep(1)
    assert not _processes_tagged(tag), "a process outlived the job"
    assert not (tmp_path / "wide" / "latest_checkpointed_iteration.txt").exists()


def test_nothing_outlives_a_rank_killed_while_its_writers_run(source, tmp_path):
    """dist_checkpointing forks writer processes; one of a SIGKILLed rank used to wait forever on a
    queue nobody reads, holding the launcher's output pipe."""
    tag = uuid.uuid4().hex
    killed = torchrun(2, "expand_sharded.py", "--load", source, "--save", tmp_path / "wide", "--tp", "2",
                      "--timeout-minutes", "0.5", env={"MEGACLONE_FAULT_INJECT": "writing:1", "MEGACLONE_TEST_TAG": tag},
                      timeout=240)  # a surviving writer holds the output pipe: the run never returns
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr
    time.sleep(2)
    survivors = _processes_tagged(tag)
    assert not survivors, [p.cmdline() for p in survivors]
    assert not (tmp_path / "wide" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("fault,said", [("interrupt", "interrupted"), ("terminate", "terminated")])
def test_ctrl_c_and_sigterm_end_every_rank_in_one_line_and_publish_nothing(source, tmp_path, fault, said):
    """SIGINT to the launcher and every rank (what Ctrl-C in a terminal does to its process group), or
    SIGTERM (what a scheduler cancelling the job sends), sent by rank 0 while reading: no traceback,
    nothing published, nothing left."""
    import os
    import subprocess
    import sys

    from util import ROOT

    tag = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tools/expand_sharded.py", "--load",
         str(source), "--save", str(tmp_path / "wide"), "--tp", "2", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, start_new_session=True,  # its own group
        env={**os.environ, "MEGACLONE_FAULT_INJECT": f"{fault}-read:0", "MEGACLONE_TEST_TAG": tag})
    assert proc.returncode != 0
    assert f"error: rank 0: {said}; nothing was published" in proc.stderr, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines()
            if line.strip().startswith("File \"") and ("megaclone" in line or "tools/" in line)]
    assert not ours and "KeyboardInterrupt" not in proc.stderr and "Terminated" not in proc.stderr, proc.stderr[-3000:]
    time.sleep(1)
    assert not _processes_tagged(tag), "a process outlived the job"
    assert not (tmp_path / "wide" / "latest_checkpointed_iteration.txt").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 KiB disk."""
    with tmpfs(tmp_path / "tiny", "size=300k") as mount:
        yield mount


def test_a_full_disk_says_so_and_leaves_no_partial_checkpoint(source, tiny_disk):
    full = torchrun(2, "expand_sharded.py", "--load", source, "--save", tiny_disk / "wide", "--tp", "2",
                    "--timeout-minutes", "0.5")
    assert full.returncode != 0
    assert "is full; the partial output" in full.stderr and "fix: free space there" in full.stderr
    # one line per rank; the only traceback is torchrun's own report
    assert full.stderr.count("Traceback (most recent call last)") <= 1, full.stderr[-3000:]
    assert "CheckpointException" not in full.stderr, full.stderr[-3000:]
    assert not list(tiny_disk.rglob("*")), "partial files were left behind"


def test_sigterm_while_a_rank_forks_its_writer_ends_every_rank_and_publishes_nothing(source, tmp_path):
    """The signal lands inside os.fork (dist_checkpointing starting a writer), where a raised exception
    used to be swallowed and the job went on to publish with exit 0."""
    tag = uuid.uuid4().hex
    proc = torchrun(2, "expand_sharded.py", "--load", source, "--save", tmp_path / "wide", "--tp", "2",
                    "--no-progress", env={"MEGACLONE_FAULT_INJECT": "sigterm-fork:1", "MEGACLONE_TEST_TAG": tag})
    assert proc.returncode != 0 and "exitcode  : 143" in proc.stderr, proc.stderr[-3000:]
    assert "error: rank 1: terminated; nothing was published" in proc.stderr
    ours = [line for line in proc.stderr.splitlines()
            if line.strip().startswith("File \"") and ("megaclone" in line or "tools/" in line)]
    assert not ours and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "wide" / "latest_checkpointed_iteration.txt").exists()
    time.sleep(1)
    assert not _processes_tagged(tag), "a process outlived the job"


def test_ranks_end_when_their_launcher_is_killed_mid_write(source, tmp_path):
    """torchrun starts its workers in sessions of their own: SIGKILL to torchrun's process group
    reaches none of them. Each rank notices its launcher is gone and ends; nothing is published."""
    import subprocess
    import sys

    from util import ROOT

    tag = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tools/expand_sharded.py", "--load",
         str(source), "--save", str(tmp_path / "wide"), "--tp", "2", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, start_new_session=True,  # its own group
        env={**__import__("os").environ, "MEGACLONE_FAULT_INJECT": "killlauncher-fork:1", "MEGACLONE_TEST_TAG": tag})
    assert proc.returncode == -9
    deadline = time.time() + 10
    while _processes_tagged(tag):
        assert time.time() < deadline, [p.cmdline() for p in _processes_tagged(tag)]
        time.sleep(0.2)
    assert not (tmp_path / "wide" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("to", ["--save", "--save-hf"])
def test_a_file_size_limit_says_so_and_leaves_no_partial_output(source, tmp_path, to):
    """EFBIG (ulimit -f) during the write: one line naming the limit and the fix, the partial files
    removed, nothing published (a world of one; the limit is inherited by the forked writers)."""
    import resource
    import subprocess
    import sys

    from util import ROOT

    load = ["--load", str(source), "--tp", "1"]
    if to == "--save-hf":
        hf = tmp_path / "hf"
        assert subprocess.run([sys.executable, "tools/export_hf.py", "--load", str(source), "--save", str(hf)],
                              cwd=ROOT, capture_output=True).returncode == 0
        load = ["--load-hf", str(hf)]
    out = tmp_path / "wide"
    proc = subprocess.run([sys.executable, "tools/expand_sharded.py", *load, to, str(out), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "reached the file-size limit" in proc.stderr and "fix: raise the limit (ulimit -f unlimited)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (out / "latest_checkpointed_iteration.txt").exists() and not (out / "config.json").exists()
    assert not [p for p in out.rglob("*") if p.is_file()], "partial files were left behind"


@pytest.mark.parametrize("job,fault", [("export", "sigterm-publish:0"), ("save-hf", "sigint-publish:0"),
                                       ("trainer", "sigterm-fork:0")])
def test_a_stop_at_the_fork_or_the_publish_of_every_writer_publishes_nothing(source, tmp_path, job, fault):
    """The same commit for every writer (a world of one each): export's and --save-hf's config.json and
    the trainer's tracker file do not appear, the rank ends with one line and 130/143."""
    import subprocess
    import sys

    from util import ROOT

    from megaclone.train.data import preprocess

    out = tmp_path / "out"
    if job == "export":
        cmd = ["tools/export_hf.py", "--load", source, "--save", out]
    elif job == "save-hf":
        hf = tmp_path / "hf"
        assert subprocess.run([sys.executable, "tools/export_hf.py", "--load", str(source), "--save", str(hf)],
                              cwd=ROOT, capture_output=True).returncode == 0
        cmd = ["tools/expand_sharded.py", "--load-hf", hf, "--save-hf", out, "--no-progress"]
    else:
        preprocess(tmp_path / "data", seed=1234, max_documents=20)
        cmd = ["examples/pretrain_gpt.py", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
               "--data-path", tmp_path / "data", "--split", "100,0,0", "--seq-length", "16", "--micro-batch-size",
               "1", "--train-iters", "1", "--eval-iters", "0", "--lr", "1e-3", "--save", out]
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "MEGACLONE_FAULT_INJECT": fault})
    what = "interrupted" if fault.startswith("sigint") else "terminated"
    assert proc.returncode == (130 if what == "interrupted" else 143), proc.stderr[-3000:]
    assert f"error: rank 0: {what}; nothing was published" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (out / "config.json").exists() and not (out / "latest_checkpointed_iteration.txt").exists()
