#!/usr/bin/env python
"""Write a Megatron indexed dataset (PREFIX.bin / PREFIX.idx) with megatron-core's own builder.

The checkout's form of ``megaclone preprocess-data`` (megaclone/commands/preprocess_data.py): the same parser and job."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaclone import cli  # noqa: E402  (torch-free: flags parse before any heavy import)
from megaclone.commands.preprocess_data import main, parse_args  # noqa: E402, F401

if __name__ == "__main__":
    cli.run(main)
