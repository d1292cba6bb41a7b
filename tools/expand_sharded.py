#!/usr/bin/env python
"""Grow a Megatron GPT checkpoint in width with HyperCloning (and in depth), one process per destination

The checkout's form of ``megaclone grow`` (megaclone/commands/grow.py): the same parser and job."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaclone import cli  # noqa: E402  (torch-free: flags parse before any heavy import)
from megaclone.commands.grow import main, parse_args  # noqa: E402, F401

if __name__ == "__main__":
    cli.run(main)
