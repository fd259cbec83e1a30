"""Velocity-based control of the sparsity weights lambda_l (paper appendix A.2).

The wanted trajectory of each level's L0 is a first-order decay toward the target,

    dL0* = -eta (L0_ema - L0_target),

with L0 tracked by an EMA (momentum 0.999). Each step compares the observed change of the
EMA with dL0*: when L0 falls faster than wanted, lambda_l shrinks; otherwise it grows.
The step is multiplicative (lambda *= exp(+-lambda_step)) so that lambda stays positive
and moves by the same ratio at any scale.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    ):
        self.target, self.eta, self.momentum, self.step_size = target_l0, eta, momentum, lambda_step
        self.lambdas = torch.full((n_levels,), lambda_init, device=device)
        self.l0_ema = torch.zeros(n_levels, device=device)
        self.started = False

    @torch.no_grad()
    def update(self, l0: Tensor) -> None:
        """One control step from the batch's per-level L0 (stays on the device: no sync)."""
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
