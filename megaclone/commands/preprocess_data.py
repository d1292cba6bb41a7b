"""Write a Megatron indexed dataset (PREFIX.bin / PREFIX.idx) with megatron-core's own builder.

    python tools/preprocess_data.py --output-prefix data/stdlib            # bundled corpus
    python tools/preprocess_data.py --input notes/ README.md --output-prefix data/mine

With no --input the corpus is this Python's standard library source (found through sysconfig): real
text nobody here wrote that every machine has. Documents are shuffled with --seed, so Megatron's
--split (e.g. 98,2,0) draws validation documents from the whole corpus. Train on the result with
Megatron-LM's --tokenizer-type NullTokenizer --vocab-size 256 (bytes, end-of-document id 256).
"""

import argparse
import sys


from megaclone import cli  # torch-free: flags parse before any heavy import


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="files or directories (default: the Python standard library)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", default="byte", help="tokenizer (default and only built-in: byte)")
    p.add_argument("--seed", type=int, default=1234, help="document-order shuffle seed (default 1234)")
    p.add_argument("--skip-documents", type=int, default=0,
                   help="drop the first N documents after shuffling (disjoint datasets from one corpus)")
    p.add_argument("--max-documents", type=int, help="keep only the first N documents after shuffling (and skipping)")
    p.add_argument("--verbose-skips", action="store_true", help="name every skipped file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx dataset")
    return cli.parse(p, argv)


def main() -> int:
    args = parse_args()
    from megaclone.train import data

    source = ", ".join(args.input) if args.input else f"standard library at {data.stdlib_root()}"
    stats = data.preprocess(args.output_prefix, args.input or (), args.tokenizer, args.seed, args.skip_documents,
                            args.max_documents, args.overwrite, progress=sys.stderr.isatty())
    if stats.skipped and (len(stats.skipped) <= 3 or args.verbose_skips):
        for path, why in stats.skipped:
            print(f"skipped {path}: {why}")
    elif stats.skipped:  # one line, the reasons counted (a whole library has dozens of empty files)
        reasons: dict[str, int] = {}
        for _, why in stats.skipped:
            reasons[why] = reasons.get(why, 0) + 1
        print("skipped " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
              + " files (--verbose-skips names them)")
    training_flags = data.get_tokenizer(args.tokenizer).training_flags()
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in training_flags.items())
    print(f"{stats.documents} documents, {stats.tokens:,} tokens from {source} "
          f"({len(stats.skipped)} skipped) -> {stats.prefix}.bin/.idx\ntrain with: --data-path {stats.prefix} {flags}")
    return 0

