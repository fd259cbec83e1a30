"""JumpReLU and its straight-through estimator (paper section 3; Rajamanoharan et al. 2024).

    a = pi H(pi - theta),  dH/dtheta ~ -(1/eps) K((pi - theta)/eps),  K = 1 on |u| < 1/2

eps is the bandwidth (design §1), one for all features or one per feature (HSAE.eps).
Only theta gets a pseudo-gradient through H; pi gets the exact gradient of a where the
feature is active. The support constraint's step (`SupportStep`) is the exception: it is
meant to move where a feature fires, so pi gets the pseudo-gradient too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rectangle(u: Tensor) -> Tensor:
    """Kernel K of the straight-through estimator: 1 on |u| < 1/2."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """a = pi H(pi - theta); d/dtheta uses the pseudo-derivative -(theta/eps) K((pi-theta)/eps)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: Tensor | float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        grad_pre = grad * (pre > theta)
        kernel = rectangle((pre - theta) / ctx.eps)
        # theta is per feature [n] against a batch [B, n], or per entry like pre
        grad_theta = (-(theta / ctx.eps) * kernel * grad).sum_to_size(theta.shape)
        return grad_pre, grad_theta, None


class Step(torch.autograd.Function):
    """H(pi - theta) for the L0 penalty; only theta gets a gradient: -(1/eps) K((pi-theta)/eps)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: Tensor | float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        kernel = rectangle((pre - theta) / ctx.eps)
        grad_theta = (-(1.0 / ctx.eps) * kernel * grad).sum_to_size(theta.shape)
        return torch.zeros_like(pre), grad_theta, None


class SupportStep(Step):
    """H(pi - theta) for the support constraint: `Step`'s forward, with pseudo-gradients
    for both pi, +(1/eps) K((pi-theta)/eps), and theta, -(1/eps) K((pi-theta)/eps).

    The L0 penalty's `Step` moves only theta: it prices how often a feature fires. The
    support constraint prices *where* a child fires (outside its parent), which is the
    encoder's to change, so the same straight-through window also reaches pi, and from it
    W_enc and b_enc."""

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        window = (1.0 / ctx.eps) * rectangle((pre - theta) / ctx.eps) * grad
        return window, (-window).sum_to_size(theta.shape), None
