#!/usr/bin/env python
"""Build a small trained GPT source checkpoint in Megatron-LM's layout (the bundled default).

The checkout's form of ``megaclone make-source`` (megaclone/commands/make_source.py): the same parser and job."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaclone import cli  # noqa: E402  (torch-free: flags parse before any heavy import)
from megaclone.commands.make_source import main, parse_args  # noqa: E402, F401

if __name__ == "__main__":
    cli.run(main)
