"""What a user's install gets: a wheel built from the checkout holds every module of the package
(find_packages skips a folder without __init__.py: an editable install still imports it, a wheel
silently leaves it out), and that wheel, installed into a fresh virtual environment, gives a working
``megaclone`` command outside any checkout: it makes a source, grows it 2x at TP 2 under
``torchrun --no-python`` and verifies it."""

import os
import subprocess
import sys
import zipfile

import pytest
from util import ROOT

pytestmark = pytest.mark.slow  # builds a wheel, a venv and runs torchrun


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [built] = out.glob("megaclone-*.whl")
    return built


def test_the_wheel_holds_every_module(wheel):
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "megaclone").rglob("*.py")}
    assert expected - shipped == set(), sorted(expected - shipped)
    entry = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt"))
    assert "megaclone = megaclone.commands:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_installed_command_grows_and_verifies_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"  # torch and megatron-core come from this interpreter's site-packages
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, command = venv / "bin" / "python", venv / "bin" / "megaclone"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": ""}

    def run(*args):
        return subprocess.run([str(a) for a in args], cwd=away, capture_output=True, text=True, env=env, timeout=600)

    where = run(python, "-c", "import megaclone.pipeline.expand as m; print(m.__file__)")
    assert where.returncode == 0 and str(venv) in where.stdout, where.stdout + where.stderr  # the wheel's copy
    made = run(command, "make-source", "--preset", "llama", "--save", "small", "--train-steps", "1")
    assert made.returncode == 0, made.stderr[-3000:]
    grown = run(python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python", command, "grow",
                "--load", "small", "--save", "wide", "--tp", "2", "--factor", "2", "--verify", "--no-progress")
    assert grown.returncode == 0, grown.stdout[-2000:] + grown.stderr[-3000:]
    assert "PASS: 2 ranks" in grown.stdout and "weights: PASS" in grown.stdout
    again = run(python, "-m", "megaclone", "inspect", "wide")  # python -m megaclone, the same commands
    assert again.returncode == 0 and "hidden_size" in again.stdout, again.stderr[-2000:]
