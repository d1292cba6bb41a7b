#!/usr/bin/env python
"""Prove per rank that an expanded checkpoint computes the source model's logits, and that its

The checkout's form of ``megaclone verify`` (megaclone/commands/verify.py): the same parser and job."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaclone import cli  # noqa: E402  (torch-free: flags parse before any heavy import)
from megaclone.commands.verify import main, parse_args  # noqa: E402, F401

if __name__ == "__main__":
    cli.run(main)
