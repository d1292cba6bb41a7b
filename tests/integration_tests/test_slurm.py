"""A real SLURM cluster of one node on this machine (Debian's slurm-wlm: munged, slurmctld and slurmd
started here, each from a configuration written for the test): the bundled batch script
examples/slurm/expand_and_verify.sbatch grows the CLI source 2x at TP 2 with two srun tasks and
verifies it with two more, and `srun torchrun` verifies it once again. Two tasks, not four: on two
cores a rank more doubles each step's start-up, and rank 1 already proves the task-to-rank mapping.

Skipped, with the reason, where SLURM is not installed (.ci/run installs slurm-wlm and munge when it
can) or the daemons cannot start (they need root)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from util import ROOT

pytestmark = pytest.mark.slow  # a cluster and three 2-rank jobs

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path) -> Path:
    """One node of at least 4 CPUs (config_overrides: slurmd takes the configured count on a smaller
    machine, so a task per rank fits), every file under ``root``."""
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=megaclone
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={max(4, os.cpu_count() or 1)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    return conf


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    root = tmp_path_factory.mktemp("slurm")
    conf = _config(root)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        started.append(subprocess.Popen(["munged", "--force", "--foreground"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        time.sleep(1)
    for daemon in ("slurmctld", "slurmd"):
        started.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    try:
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mixed"):
                break
            time.sleep(1)
        else:
            logs = "".join((root / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                           if (root / f).exists())
            pytest.skip(f"the SLURM node did not come up (state {state!r}):\n{logs}")
        yield env
    finally:
        for proc in reversed(started):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_for_job(job_id: str, env: dict, timeout: float = 900) -> tuple[str, str]:
    """(JobState, ExitCode) once the job has ended. Polled here every half second: ``sbatch --wait``
    polls at a growing interval and returned about 30 s after this job had ended here."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
        fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)
        if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return fields["JobState"], fields.get("ExitCode", "")
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s")


def test_the_batch_script_expands_and_verifies_with_one_srun_task_per_rank(cluster, cli_source, tmp_path):
    dst, log = tmp_path / "wide", tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "1", "--ntasks", "2", "--ntasks-per-node", "2", "--overcommit",
         "--output", str(log), "examples/slurm/expand_and_verify.sbatch"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**cluster, "SRC": str(cli_source), "DST": str(dst), "PATH": f"{Path(sys.executable).parent}:"
             + os.environ["PATH"]})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    state = _wait_for_job(submitted.stdout.strip().split(";")[0], cluster)
    out = log.read_text() if log.exists() else ""
    assert state == ("COMPLETED", "0:0"), f"{state}\n{out[-4000:]}"
    assert "PASS: 2 ranks" in out and "weights: PASS" in out, out[-4000:]
    assert (dst / "latest_checkpointed_iteration.txt").read_text() == "0"

    # srun torchrun: one task, torchrun's two ranks (torchrun's variables win over SLURM's)
    again = subprocess.run(
        ["srun", "--nodes", "1", "--ntasks", "1", "--overcommit", sys.executable, "-m", "torch.distributed.run",
         "--nproc_per_node", "2", "tools/verify_logits.py", "--src", str(cli_source), "--dst", str(dst),
         "--no-weights"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=cluster)
    assert again.returncode == 0 and "PASS: 2 ranks" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
