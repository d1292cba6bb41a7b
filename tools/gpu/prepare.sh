#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what tools/gpu/check.sh needs on the device machine, which reaches no
# registry: the megatron-core wheel for its Python (3.12) and the packages its image lacks. Megatron-LM's
# source at the matching tag (core_v0.16.1) comes from the session's fetch tool into .gpu/Megatron-LM
# (git --git-dir=<fetched> worktree, or an archive of the tag): it is carried, never committed.
set -euo pipefail
mkdir -p .gpu/wheels
pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  -d .gpu/wheels "megatron-core==0.16.1" einops
ls -la .gpu/wheels
[ -d .gpu/Megatron-LM ] || echo "note: .gpu/Megatron-LM is missing: fetch NVIDIA/Megatron-LM at core_v0.16.1 into it"
