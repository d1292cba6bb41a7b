"""A wheel built from the checkout holds every module of the package (find_packages skips a folder
without __init__.py: an editable install still imports it, a wheel silently leaves it out)."""

import subprocess
import sys
import zipfile

import pytest
from util import ROOT


@pytest.mark.slow
def test_the_wheel_holds_every_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [wheel] = tmp_path.glob("megaclone-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "megaclone").rglob("*.py")}
    assert expected - shipped == set(), sorted(expected - shipped)
