#!/usr/bin/env bash
# The GPU check (issue 38), one call of the device tool, under 8 minutes. It needs, carried in .gpu/
# (ignored by git; tools/gpu/prepare.sh fills it on a machine with the registry):
#   .gpu/wheels/       megatron-core 0.16.1 for Python 3.12 and what the device image lacks
#   .gpu/Megatron-LM/  Megatron-LM's source at the tag of that megatron-core (core_v0.16.1)
# and writes to $OUT: the tiny checkpoints Megatron-LM itself saved (fixtures for tests/data), the
# logs and summary.txt (first loss against the source's, verify's worst difference, time per step).
#
#   run(command="bash tools/gpu/check.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
OUT=${OUT:?set by the device tool}
ML=${MEGATRON_LM:-.gpu/Megatron-LM}
W=$(mktemp -d)
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
[ -d "$ML" ] && [ -d .gpu/wheels ] || { echo "error: .gpu/wheels and $ML must be carried (tools/gpu/prepare.sh)"; exit 2; }

pip install -q --no-deps .gpu/wheels/*.whl
pip install -q --no-deps -e .
python -c "import torch, megatron.core; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'megatron-core', megatron.core.__version__)" | tee -a "$OUT/summary.txt"

python -m megaclone preprocess-data --output-prefix "$W/data/text" --max-documents 400 > "$OUT/data.log"
SHAPE=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --group-query-attention --num-query-groups 2
       --ffn-hidden-size 352 --swiglu --normalization RMSNorm --disable-bias-linear --position-embedding-type rope
       --untie-embeddings-and-output-weights --seq-length 128 --max-position-embeddings 128)
TRAIN=(--micro-batch-size 4 --global-batch-size 8 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2
       --tokenizer-type NullTokenizer --vocab-size 256 --data-path "$W/data/text" --split 98,2,0
       --eval-iters 1 --eval-interval 1000 --log-interval 1 --ckpt-format torch_dist --transformer-impl local
       --tensor-model-parallel-size 1 --seed 1234 --bf16)
train() {  # name, extra flags...: Megatron-LM's own pretrain_gpt.py, one GPU
  local name=$1; shift
  torchrun --nproc_per_node 1 "$ML/pretrain_gpt.py" "${SHAPE[@]}" "${TRAIN[@]}" "$@" > "$OUT/train-$name.log" 2>&1 \
    || { tail -40 "$OUT/train-$name.log"; exit 1; }
}
log "Megatron-LM trains: distributed optimizer (dp_reshardable, fully_reshardable) and without it"
train dp --train-iters 6 --save "$W/dp" --save-interval 6 --use-distributed-optimizer
train full --train-iters 6 --save "$W/full" --save-interval 6 --use-distributed-optimizer --dist-ckpt-optim-fully-reshardable
train plain --train-iters 6 --save "$W/plain" --save-interval 6

for c in dp full plain; do
  log "megaclone grows $c 2x on CUDA (NCCL) and verifies"
  torchrun --nproc_per_node 1 --no-python megaclone grow --load "$W/$c" --save "$W/$c-wide" --tp 1 --factor 2 \
    --device cuda --verify --no-progress 2>&1 | tee "$OUT/grow-$c.log" | grep -E "PASS|FAIL|error" | tee -a "$OUT/summary.txt"
done
log "megaclone --grow-optimizer on fully_reshardable (refused with the fix until it reads that form)"
torchrun --nproc_per_node 1 --no-python megaclone grow --load "$W/full" --save "$W/full-adam" --tp 1 --factor 2 \
  --device cuda --grow-optimizer --no-progress 2>&1 | tail -3 | tee -a "$OUT/summary.txt" || true

log "Megatron-LM continues from the clone (--finetune --use-checkpoint-args)"
torchrun --nproc_per_node 1 "$ML/pretrain_gpt.py" "${TRAIN[@]}" --load "$W/plain-wide" --finetune --use-checkpoint-args \
  --train-iters 3 --seq-length 128 --max-position-embeddings 128 > "$OUT/continue.log" 2>&1 || { tail -40 "$OUT/continue.log"; exit 1; }
grep -m1 "iteration        1/" "$OUT/train-plain.log" | tee -a "$OUT/summary.txt" || true
grep -m1 "iteration        1/" "$OUT/continue.log" | tee -a "$OUT/summary.txt" || true
grep -E "elapsed time per iteration" "$OUT/continue.log" | tail -1 | tee -a "$OUT/summary.txt" || true

tar czf "$OUT/megatron-lm-checkpoints.tgz" -C "$W" dp full plain
log "done: $(du -sh "$OUT/megatron-lm-checkpoints.tgz" | cut -f1) of fixtures"
