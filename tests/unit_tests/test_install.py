"""Installing megaclone leaves a Megatron environment's torch and megatron-core alone.

The requirements are read from setup.py itself (not from an installed copy, which may be stale) and
must admit the releases Megatron training environments hold; pip's own resolver, asked for a dry run
in this environment, must plan to install megaclone and nothing else.
"""

import ast
import sys

import pytest
from packaging.requirements import Requirement
from util import ROOT, run


def install_requires() -> dict[str, Requirement]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    value = next(k.value for k in call.keywords if k.arg == "install_requires")
    return {r.name: r for r in map(Requirement, ast.literal_eval(value))}


# releases in NGC containers and Megatron-LM's requirements today, and the ones run here
TORCH = ("2.6.0", "2.13.0", "2.14.1", "2.15.0")
MEGATRON_CORE = ("0.14.0", "0.15.3", "0.16.1", "0.17.0", "0.19.2")


@pytest.mark.parametrize("name,versions", [("torch", TORCH), ("megatron-core", MEGATRON_CORE)])
def test_requirements_admit_what_megatron_environments_hold(name, versions):
    spec = install_requires()[name].specifier
    assert all(spec.contains(v) for v in versions), (name, str(spec))


@pytest.mark.slow
def test_pip_plans_to_install_nothing_but_megaclone():
    """tools/check_install.py against this environment, from installed packages only (no network):
    pip's own resolver plans megaclone and nothing else. The same script, pointed at another venv's
    interpreter, is how the README's torch 2.14.1 / megatron-core 0.15.3 check was run."""
    proc = run([sys.executable, ROOT / "tools" / "check_install.py", "--no-index"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pip would install: megaclone 0.1.0\n" in proc.stdout, proc.stdout
