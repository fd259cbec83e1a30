"""The straight-through window per feature (HSAEConfig.window, HSAE.eps)."""

from __future__ import annotations

import copy

import pytest
import torch

from hsae.config import ConfigError, HSAEConfig
from hsae.method.losses import LossInputs, hsae_loss_dense
from hsae.method.losses_live import encode_live, hsae_loss_live
from hsae.method.model import HSAE


def _model(window: str) -> HSAE:
    model = HSAE(10, (8, 16), bandwidth=0.3, seed=0, decoder_init_norm=0.5, window=window)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for level, n in enumerate(model.sizes):
            model.W_enc[level].add_(0.3 * torch.randn(10, n, generator=gen))
            model.threshold[level].copy_(0.3 + 0.3 * torch.rand(n, generator=gen))
    return model


def _rescaled(model: HSAE, level: int, feature: int, c: float) -> HSAE:
    """The same function with one feature's scale moved: pi, b_enc and theta times c, its
    decoder row divided by c, so a_i d_i is unchanged."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.W_enc[level][:, feature] *= c
        other.b_enc[level][feature] *= c
        other.threshold[level][feature] *= c
        other.W_dec[level][feature] /= c
    return other


def _inputs(model: HSAE) -> LossInputs:
    return LossInputs([torch.full((16,), -1)], torch.tensor([0.1, 0.2]), 0.0, [None], None)


def test_encoder_window_is_bandwidth_times_the_encoder_column_norm() -> None:
    model = _model("encoder")
    with torch.no_grad():
        model.W_enc[0][:, 3] = 0.0
        model.W_enc[0][0, 3], model.W_enc[0][1, 3] = 3.0, 4.0  # norm 5
    eps = model.eps(0)
    assert eps[3].item() == pytest.approx(0.3 * 5)
    assert not eps.requires_grad
    assert _model("fixed").eps(0) == 0.3


@pytest.mark.parametrize("loss", [hsae_loss_dense, hsae_loss_live], ids=["dense", "live"])
def test_encoder_window_follows_a_rescaled_feature(loss) -> None:
    """Rescaling feature i by c leaves the function unchanged. With the encoder window the
    same entries sit in i's window and theta_i's straight-through gradient is the
    original's / c (the chain rule through theta_B = c theta_A), so training does not
    depend on the scale a feature happens to have. A fixed window does not follow."""
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(2)) * 1.5
    level, feature, c = 1, 5, 4.0
    grads = {}
    for window in ("encoder", "fixed"):
        a = _model(window)
        b = _rescaled(a, level, feature, c)
        outs = []
        for model in (a, b):
            model.zero_grad(set_to_none=True)
            out = loss(model, x, _inputs(model))
            out.total.backward()
            outs.append(out)
        assert torch.allclose(outs[0].mse, outs[1].mse, rtol=1e-5)  # the same function
        grads[window] = (a.threshold[level].grad[feature], b.threshold[level].grad[feature])
    g_a, g_b = grads["encoder"]
    assert g_a.abs() > 0, "the feature's window must hold entries for the check to bite"
    assert g_b.item() == pytest.approx(g_a.item() / c, rel=1e-5)
    g_a, g_b = grads["fixed"]
    assert g_b.item() != pytest.approx(g_a.item() / c, rel=1e-2)


def test_encoder_window_live_entries_follow_the_rescaled_feature() -> None:
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(3))
    a = _model("encoder")
    b = _rescaled(a, 0, 2, 0.1)
    la, lb = encode_live(a, x, 0), encode_live(b, x, 0)
    assert torch.equal(la.feat, lb.feat) and torch.equal(la.tok, lb.tok)
    assert torch.allclose(lb.eps[lb.feat == 2], 0.1 * la.eps[la.feat == 2])


def test_window_is_a_checked_choice() -> None:
    with pytest.raises(ConfigError, match="window"):
        HSAEConfig(window="relative").validate()
