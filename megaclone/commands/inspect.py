"""Print a checkpoint's shape args and stored tensors; --digest adds a sha256 per tensor.

    python tools/inspect_checkpoint.py runs/wide --digest
"""

import argparse


from megaclone import cli  # torch-free: flags parse before any heavy import


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--digest", action="store_true", help="sha256 of every tensor (reads the whole checkpoint)")
    cli.add_trust_flag(p)
    args = cli.parse(p)
    from megaclone.formats.describe import describe
    from megaclone.runtime import init_distributed

    if args.digest:  # reading every tensor is megatron-core's collective load; the summary needs neither
        init_distributed("cpu")
    cli.rank0_print(describe(args.checkpoint, args.digest))
    return 0

