#!/usr/bin/env bash
# End to end on the bundled default: build a small trained Llama-like source at TP 2, grow it 2x
# into a TP 8 checkpoint (8 processes, each writing only its own shard), verify logits per rank.
set -euo pipefail
usage() {
  cat <<'TEXT'
usage: bash examples/quickstart.sh [--help]

Builds the bundled small source (Llama-like, TP 2) in $OUT_DIR/small, grows it 2x into a TP 8
checkpoint in $OUT_DIR/wide (8 processes), and verifies every rank's logits against the source.
Both directories are replaced if they hold an earlier quickstart's checkpoints.

environment:
  OUT_DIR   where the checkpoints go (default: runs)
TEXT
}
case "${1:-}" in
  "") ;;
  -h|--help) usage; exit 0 ;;
  *) echo "error: unknown argument '$1'" >&2; echo "  fix: run it without arguments (set OUT_DIR to choose the output)" >&2
     usage >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # what torchrun sets anyway; set here, it does not print a notice about it
torchrun --nproc_per_node 2 tools/make_source.py --save "$OUT/small" --tp 2 --overwrite
# --verify: then verify_logits.py's checks in the same 8 processes (one start-up instead of two)
torchrun --nproc_per_node 8 tools/expand_sharded.py --load "$OUT/small" --save "$OUT/wide" --tp 8 --factor 2 --overwrite \
    --verify
