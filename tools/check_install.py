#!/usr/bin/env python
"""Would installing megaclone into an environment replace its torch or megatron-core?

    python tools/check_install.py --python /path/to/megatron-venv/bin/python

Asks that environment's own pip for a dry run of ``pip install -e <this repository>`` and reports
what it plans to install. Exit 0 when the plan leaves torch and megatron-core as they are (megaclone
itself and missing small dependencies may be planned), 1 when it would install either, 2 when pip
fails. ``--no-index`` plans from what is installed alone (no network).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEPT = ("torch", "megatron-core")


def planned_installs(python: str, no_index: bool = False) -> dict[str, str]:
    """{name: version} of what ``python -m pip install --dry-run -e ROOT`` would install."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--quiet", "--dry-run", "--report", str(report), "-e", str(ROOT)]
        if no_index:
            cmd[4:4] = ["--no-index", "--no-build-isolation"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"pip's dry run failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}


def installed_version(python: str, name: str) -> str:
    proc = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "not installed"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=sys.executable, help="the environment's interpreter (default: this one)")
    p.add_argument("--no-index", action="store_true", help="plan from installed packages only (no network)")
    args = p.parse_args()
    for name in KEPT:
        print(f"installed: {name} {installed_version(args.python, name)}")
    try:
        plan = planned_installs(args.python, args.no_index)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("pip would install: " + (", ".join(f"{n} {v}" for n, v in sorted(plan.items())) or "nothing"))
    replaced = [n for n in KEPT if n in plan]
    if replaced:
        print(f"FAIL: installing megaclone would replace {', '.join(replaced)}")
        return 1
    print(f"PASS: {' and '.join(KEPT)} stay as installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
