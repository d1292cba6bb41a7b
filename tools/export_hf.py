#!/usr/bin/env python
"""Export a Megatron GPT checkpoint (e.g. a grown one) to a Hugging Face directory transformers loads.

The checkout's form of ``megaclone export-hf`` (megaclone/commands/export_hf.py): the same parser and job."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaclone import cli  # noqa: E402  (torch-free: flags parse before any heavy import)
from megaclone.commands.export_hf import main, parse_args  # noqa: E402, F401

if __name__ == "__main__":
    cli.run(main)
