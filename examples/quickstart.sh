#!/usr/bin/env bash
# End to end on the bundled default: build a small trained Llama-like source at TP 2, grow it 2x
# into a TP 8 checkpoint (8 processes, each writing only its own shard), verify logits per rank.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-runs}
torchrun --nproc_per_node 2 tools/make_source.py --save "$OUT/small" --tp 2 --overwrite
torchrun --nproc_per_node 8 tools/expand_sharded.py --load "$OUT/small" --save "$OUT/wide" --tp 8 --factor 2 --overwrite
torchrun --nproc_per_node 8 tools/verify_logits.py --src "$OUT/small" --dst "$OUT/wide"
