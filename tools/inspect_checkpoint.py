#!/usr/bin/env python
"""Print a checkpoint's shape args and stored tensors; --digest adds a sha256 per tensor.

The checkout's form of ``megaclone inspect`` (megaclone/commands/inspect.py): the same parser and job."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaclone import cli  # noqa: E402  (torch-free: flags parse before any heavy import)
from megaclone.commands.inspect import main  # noqa: E402, F401

if __name__ == "__main__":
    cli.run(main)
