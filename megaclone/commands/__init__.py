"""The ``megaclone`` command: one subcommand per tool, each a module here holding its flag parser and its
job (``main``). ``tools/*.py`` and ``examples/pretrain_gpt.py`` are thin shims over the same modules, so
flags, help, typo hints and the torch-free fast refusals are the same through every entry point:

    megaclone grow --load SRC --save DST --tp 8          (also: python -m megaclone grow ...)
    torchrun --nproc_per_node 8 --no-python megaclone grow ...
    mpirun -n 8 megaclone grow ...        srun megaclone grow ...

Only the chosen subcommand's module is imported, and it imports torch only after its flags parse.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module under megaclone.commands, what it does)
COMMANDS = {
    "grow": ("grow", "grow a checkpoint in width, depth and experts (tools/expand_sharded.py)"),
    "verify": ("verify", "a clone's per-rank logits and stored weights against its source (tools/verify_logits.py)"),
    "export-hf": ("export_hf", "a Megatron checkpoint as a Hugging Face directory (tools/export_hf.py)"),
    "inspect": ("inspect", "a checkpoint's shape args and stored tensors (tools/inspect_checkpoint.py)"),
    "make-source": ("make_source", "a small trained source checkpoint (tools/make_source.py)"),
    "preprocess-data": ("preprocess_data", "text files as Megatron's indexed dataset (tools/preprocess_data.py)"),
    "pretrain": ("pretrain", "Megatron GPT pretraining, e.g. of a clone (examples/pretrain_gpt.py)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: megaclone COMMAND [flags]   (megaclone COMMAND --help for its flags)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``megaclone COMMAND ...`` (the console script and ``python -m megaclone``)."""
    from megaclone import cli

    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if words else 2)
    name = words[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
        hint = f"did you mean: {close[0]}? " if close else ""
        sys.stderr.write(f"error: unknown command {name!r}\n  fix: {hint}(every command: megaclone --help)\n")
        sys.exit(2)
    module = importlib.import_module(f"megaclone.commands.{COMMANDS[name][0]}")
    sys.argv = [f"megaclone {name}", *words[1:]]  # argparse's prog, and the flags the command parses
    cli.run(module.main)
