"""How well the planted code itself can do under a per-row budget of k latents.

On SAE Lens's synthetic data (the benchmark's `cpu` size, benchmarks/synthetic.py) a row
is exactly the sum of its active features' directions, so the planted code reconstructs
it perfectly, but only at the row's own L0, which has a long tail (whole trees fire
together). Encoders with a per-row budget (TopK, the Tree SAE's layers, a pursuit of at
most k steps) cannot pay that on the heavy rows; a dictionary of tree composites can.
This prints, for budgets k, the FVE on fresh rows of:
- the true code cut to k features per row (magnitudes exact);
- the planted dictionary under matching pursuit restricted to the true support;
- the planted dictionary under plain matching pursuit (SAE Lens's encoder);
- with `--learned N`, a Matching Pursuit SAE of N latents trained as the benchmark's
  `mp` peer, encoding with at most k steps.

    python benchmarks/planted_code.py --learned 1024
"""

from __future__ import annotations

import argparse
import math

import torch
from synthetic import (
    BATCH,
    EVAL_ROWS,
    SIZES,
    draw_rows,
    fit_pursuit,
    synthetic_model,
)
from torch import Tensor

from hsae.evaluation.metrics import LevelStats

BUDGETS = (4, 8, 12, 16)


def pursuit(x: Tensor, dictionary: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """At most k greedy steps, each adding the allowed dictionary row with the largest
    positive inner product with the residual. As SAE Lens's `stop_on_duplicate_support`:
    a step that adds no new row to the support is the row's last (its value still counts)."""
    rows = torch.arange(x.shape[0])
    residual, acts = x.clone(), torch.zeros(x.shape[0], dictionary.shape[0])
    done = torch.zeros(x.shape[0], dtype=torch.bool)
    for _ in range(k):
        scores = residual @ dictionary.T
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -math.inf)
        pick = scores.argmax(dim=1)
        was_chosen = acts[rows, pick] != 0
        value = (residual * dictionary[pick]).sum(-1).relu() * ~done
        if allowed is not None:  # a row with nothing allowed picks nothing
            value *= allowed[rows, pick]
        acts[rows, pick] += value
        residual -= value[:, None] * dictionary[pick]
        done |= was_chosen | (value == 0)
    return acts


def first_k(code: Tensor, k: int) -> Tensor:
    """The code with only its first k active features (by index) kept on each row."""
    return code * (code.gt(0).cumsum(dim=1) <= k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learned", type=int, nargs="*", default=[], metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="the learned SAE's seed")
    parser.add_argument("--rows", type=int, default=16384, help="fresh rows measured")
    args = parser.parse_args()
    if args.rows < 2 or any(n < 1 for n in args.learned):
        parser.error("--rows takes at least 2 rows and --learned sizes of at least 1 latent")
    size = SIZES["cpu"]
    synth = synthetic_model(size)
    directions = synth.feature_dict.feature_vectors.detach().float()
    bias = synth.feature_dict.bias.detach().float()
    torch.manual_seed(size.steps)  # fresh rows, drawn apart from the benchmark's
    x, code = (t.float() for t in synth.sample_with_features(args.rows))

    def show(name: str, acts_at: dict[int, Tensor], decode) -> None:
        cells = []
        for k, acts in acts_at.items():
            r = level_result(x, acts, decode(acts))
            cells.append(f"k {k}: L0 {r['l0']:.1f} FVE {r['fve']:.3f}")
        print(f"{name:<44}" + " | ".join(cells), flush=True)

    def planted(acts: Tensor) -> Tensor:
        return acts @ directions + bias

    l0 = code.gt(0).sum(1).float()
    print(
        f"true code: L0 mean {l0.mean():.1f}, median {l0.median():.0f}, 90th percentile "
        f"{l0.quantile(0.9):.0f}, max {l0.max():.0f}; "
        f"FVE {level_result(x, code, planted(code))['fve']:.4f}"
    )
    with torch.no_grad():
        show("true code cut to k per row", {k: first_k(code, k) for k in BUDGETS}, planted)
        support = code > 0
        show(
            "planted, pursuit within the true support",
            {k: pursuit(x - bias, directions, k, support) for k in BUDGETS},
            planted,
        )
        show("planted, pursuit", {k: pursuit(x - bias, directions, k) for k in BUDGETS}, planted)
    if args.learned:
        rows = draw_rows(synth, size.steps * BATCH + EVAL_ROWS)[:-EVAL_ROWS]
    for n in args.learned:
        sae = fit_pursuit(rows, size, n, args.seed)
        show(f"learned Matching Pursuit SAE, {n} latents", pursuit_codes(sae, x), sae.decode)


def level_result(x: Tensor, acts: Tensor, recon: Tensor) -> dict:
    """L0 and FVE as every hsae report computes them (LevelStats)."""
    stats = LevelStats(acts.shape[1])
    stats.update(x, acts, recon)
    return stats.result()


def pursuit_codes(sae, x: Tensor) -> dict[int, Tensor]:
    """A trained Matching Pursuit SAE's codes of x at each budget."""
    codes = {}
    with torch.no_grad():
        for k in BUDGETS:
            sae.cfg.max_iterations = k
            codes[k] = sae.encode(x)
    return codes


if __name__ == "__main__":
    main()
