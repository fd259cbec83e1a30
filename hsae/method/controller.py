"""Velocity-based control of the sparsity weights lambda_l (paper appendix A.2).

The wanted trajectory of each level's L0 is a first-order decay toward the target,

    dL0* = -eta (L0_ema - L0_target),

with L0 tracked by an EMA (momentum 0.999). Each step compares the observed change of the
EMA with dL0*: when L0 falls faster than wanted, lambda_l shrinks; otherwise it grows.
The step is multiplicative (lambda *= exp(+-lambda_step)) so that lambda stays positive
and moves by the same ratio at any scale.

The target itself may be annealed (ours, not the paper's; `HSAEConfig.l0_start`): it
starts at a multiple of the target and falls linearly to it by ANNEAL_SHARE of the run.
Features learned while many may fire at once are parts more than sums; on the benchmark
it left fewer latents dead and raised the large levels' FVE (docs/training.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ANNEAL_SHARE = 0.5
"""An annealed L0 target reaches the final target at this share of the run's steps."""
ANNEAL_CAP = 0.25
"""An annealed target never asks a level for more than this share of its features (a
level of 32 features at target 8 is not annealed; one of 256 at target 12 is, to 36)."""


def annealed_target(target: float, start_multiple: float, step: int, steps: int) -> float:
    """The L0 target at a step: start_multiple x target at step 0, falling linearly to
    target at ANNEAL_SHARE of the steps, and target from there on."""
    left = max(0.0, 1.0 - step / max(1.0, ANNEAL_SHARE * steps))
    return target * (1.0 + (start_multiple - 1.0) * left)


class SparsityController:
    def __init__(
        self,
        n_levels: int,
        target_l0: float,
        eta: float,
        momentum: float,
        lambda_init: float,
        lambda_step: float,
        device: torch.device | str = "cpu",
        start_multiple: float = 1.0,
        steps: int = 1,
        sizes: tuple[int, ...] | None = None,
    ):
        self.final_target, self.start_multiple, self.steps = target_l0, start_multiple, steps
        widths = torch.tensor(sizes or [math.inf] * n_levels, dtype=torch.float32, device=device)
        self.caps = (widths * ANNEAL_CAP).clamp(min=target_l0)
        self.target = self.target_at(0)
        self.eta, self.momentum, self.step_size = eta, momentum, lambda_step
        self.lambdas = torch.full((n_levels,), lambda_init, device=device)
        self.l0_ema = torch.zeros(n_levels, device=device)
        self.started = False

    def target_at(self, step: int) -> Tensor:
        """[n_levels] the L0 the controller steers each level toward at a step: the target,
        or its annealing capped at ANNEAL_CAP of the level's features."""
        wanted = annealed_target(self.final_target, self.start_multiple, step, self.steps)
        return self.caps.clamp(max=wanted)

    @torch.no_grad()
    def update(self, l0: Tensor, step: int = 0) -> None:
        """One control step from the batch's per-level L0 (stays on the device: no sync),
        toward the target of the step just taken."""
        self.target = self.target_at(step)
        if not self.started:  # first step: the EMA starts at the observation
            self.l0_ema, self.started = l0.detach().clone().float(), True
            return
        new_ema = self.momentum * self.l0_ema + (1 - self.momentum) * l0.detach()
        observed = new_ema - self.l0_ema
        wanted = -self.eta * (self.l0_ema - self.target)
        direction = torch.where(observed < wanted, -1.0, 1.0)
        self.lambdas = self.lambdas * torch.exp(self.step_size * direction)
        self.l0_ema = new_ema

    def state_tensors(self) -> dict[str, Tensor]:
        return {"sparsity.lambdas": self.lambdas, "sparsity.l0_ema": self.l0_ema}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.lambdas = tensors["sparsity.lambdas"].clone()
        self.l0_ema = tensors["sparsity.l0_ema"].clone()
        self.started = True
