"""megaclone.stopping, deterministically, in small processes of one rank (no launcher, no model):
a stop signal at the fork of a writer or at the publish ends the process with one line and publishes
nothing; a signal while the main thread is stuck in a blocking call still ends it at once; a rank
whose launcher is SIGKILLed ends by itself; a stop after the publish says the output is complete."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from util import ROOT

# A job of one rank that "writes" (a forked child, as dist_checkpointing's writers are) and then
# publishes a marker file through stopping.commit, as every saver does.
JOB = textwrap.dedent("""
    import os, sys, time
    from megaclone import cli, stopping
    from megaclone.runtime import init_distributed

    def main():
        init_distributed("cpu")
        out = sys.argv[1]
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        stopping.commit(lambda: open(out, "w").write("published"), out)
        if os.environ.get("AFTER") == "sleep":
            time.sleep(60)
        return 0

    cli.run(main)
""")


def _job(tmp_path, fault: str = "", after: str = "", **kw) -> tuple[subprocess.CompletedProcess, bool]:
    out = tmp_path / "published"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEGACLONE_FAULT_INJECT": fault, "AFTER": after}
    proc = subprocess.run([sys.executable, "-c", JOB, str(out)], capture_output=True, text=True, timeout=120,
                          env=env, **kw)
    return proc, out.exists()


def test_a_clean_job_publishes(tmp_path):
    proc, published = _job(tmp_path)
    assert proc.returncode == 0 and published, proc.stderr[-2000:]


def test_sigterm_at_the_fork_ends_the_rank_and_publishes_nothing(tmp_path):
    """The signal lands inside os.fork's at-fork hooks, where a raised exception is swallowed
    ('Exception ignored in ... _releaseLock') and the job used to go on and publish."""
    proc, published = _job(tmp_path, "sigterm-fork:0")
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: rank 0: terminated; nothing was published"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert not published


def test_sigint_at_the_publish_ends_the_rank_and_publishes_nothing(tmp_path):
    proc, published = _job(tmp_path, "sigint-publish:0")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "error: rank 0: interrupted; nothing was published" in proc.stderr
    assert "Traceback" not in proc.stderr and not published


def test_a_stop_after_the_publish_says_the_output_is_complete(tmp_path):
    out = tmp_path / "published"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AFTER": "sleep"}
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(out)], stderr=subprocess.PIPE, text=True, env=env)
    while not out.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert f"error: rank 0: terminated; after publishing {out} (it is complete)" in err


BLOCKED = textwrap.dedent("""
    import sys, threading
    from megaclone import cli

    def main():
        print("ready", flush=True)
        threading.Event().wait()  # a C-level wait that never returns to the interpreter's main loop
        return 0

    cli.run(main)
""")


def test_sigterm_ends_a_rank_blocked_in_a_c_call(tmp_path):
    """A rank waiting in a collective gets no Python signal handler run until the call returns (three
    ranks were SIGKILLed 30 s after torchrun's SIGTERM); the watcher thread ends it at once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.time() - t0 < 5
    assert "error: rank 0: terminated; nothing was published" in err


LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    # a launcher as torchrun is: its worker in a session of its own, with a launcher's environment
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=open(sys.argv[2], "w"), text=True)
    assert worker.stdout.readline().strip() == "ready"
    print(worker.pid, flush=True)
    time.sleep(600)
""")


def test_a_rank_whose_launcher_is_killed_ends_by_itself(tmp_path):
    """SIGKILL to the launcher reaches no worker of another session: the rank notices its parent is
    gone and ends within a second, publishing nothing."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "worker.err"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, BLOCKED, str(log)], stdout=subprocess.PIPE,
                                text=True, env=env)
    worker = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 10
    while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the worker outlived its launcher"
        time.sleep(0.1)
    assert f"error: rank 0: the launcher (pid {launcher.pid}) died; nothing was published" in log.read_text()
