"""The live-entry loss (hsae/method/losses_live.py) against the dense reference
(losses.hsae_loss_dense): same value, same gradient for every parameter, with every
mechanism switched on."""

from __future__ import annotations

import pytest
import torch

from hsae.method.losses import LossInputs, hsae_loss_dense
from hsae.method.losses_live import encode_live, hsae_loss_live, live_entries
from hsae.method.model import HSAE


def _model(
    sizes=(16, 32, 64), d=12, bandwidth=0.2, seed=0, free_norms=False, window="fixed"
) -> HSAE:
    model = HSAE(
        d, sizes, bandwidth=bandwidth, seed=seed, decoder_init_norm=0.5 if free_norms else None,
        window=window,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for level, n in enumerate(sizes):
            model.W_enc[level].mul_(0.8).add_(0.3 * torch.randn(d, n, generator=gen))
            model.b_enc[level].copy_(0.2 * torch.randn(n, generator=gen))
            model.b_dec[level].copy_(0.3 * torch.randn(d, generator=gen))
            model.threshold[level].copy_(0.6 + 0.4 * torch.rand(n, generator=gen))
            if free_norms:  # rows of unequal norms, as training leaves them
                model.W_dec[level].mul_(torch.rand(n, 1, generator=gen) * 3 + 0.2)
    return model


def _inputs(model: HSAE, seed=0, rho=0.3, dead=True, support=0.0, quadratic=False) -> LossInputs:
    gen = torch.Generator().manual_seed(seed + 2)
    parents, substitution = [], []
    for n_p, n_c in zip(model.sizes, model.sizes[1:]):
        parent = torch.randint(0, n_p, (n_c,), generator=gen)
        parent[torch.rand(n_c, generator=gen) < 0.25] = -1  # partial tree
        parents.append(parent)
        substitution.append(torch.rand(n_p, generator=gen) < 0.3)
    dead_masks = [torch.rand(n, generator=gen) < 0.2 for n in model.sizes] if dead else None
    lambdas = torch.tensor([0.05, 0.1, 0.2])[: model.n_levels]
    targets = torch.tensor([3.0, 5.0, 8.0])[: model.n_levels] if quadratic else None
    return LossInputs(
        parents, lambdas, rho, substitution, dead_masks, support=support, l0_targets=targets
    )


def _loss_and_grads(model: HSAE, x, inp: LossInputs, fn, **kw):
    """The loss and the gradients a training step uses: decoder rows are unit norm, so
    their radial gradient is dropped (HSAE.project_decoder_grads) in both paths."""
    model.zero_grad(set_to_none=True)
    out = fn(model, x, inp, **kw)
    out.total.backward()
    model.project_decoder_grads()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("sync_free", [False, True], ids=["exact", "capacity"])
@pytest.mark.parametrize(
    "rho, dead, support, free_norms, quadratic, window",
    [
        (0.3, True, 0.0, False, False, "fixed"),
        (0.0, False, 0.0, False, False, "fixed"),
        (2.0, False, 0.0, False, False, "fixed"),
        (0.3, True, 3.0, False, False, "fixed"),
        (2.0, True, 0.0, True, False, "fixed"),
        (0.3, True, 0.0, True, True, "fixed"),
        (0.3, True, 3.0, True, False, "encoder"),
        (0.3, True, 0.0, True, True, "encoder"),
    ],
)
def test_live_loss_equals_dense_loss_and_gradients(
    sync_free, rho, dead, support, free_norms, quadratic, window
):
    """Both paths, term by term and gradient by gradient; with free decoder norms every
    gradient is compared whole (HSAE.project_decoder_grads leaves free rows alone); with
    the quadratic sparsity loss its term is the hand formula on each row's count; with the
    encoder window every feature has its own."""
    torch.manual_seed(0)
    model = _model(free_norms=free_norms, window=window)
    x = torch.randn(48, 12, generator=torch.Generator().manual_seed(5)) * 1.5
    inp = _inputs(model, rho=rho, dead=dead, support=support, quadratic=quadratic)
    dense, g_dense = _loss_and_grads(model, x, inp, hsae_loss_dense)
    inp.capacity = [48 * n for n in model.sizes] if sync_free else None
    live, g_live = _loss_and_grads(model, x, inp, hsae_loss_live)
    # the window below theta holds entries: theta's straight-through gradient is exercised
    pre = model.pre_acts(x, 1)
    in_window = (pre > model.threshold[1] - 0.1) & (pre <= model.threshold[1])
    assert in_window.sum() > 10
    assert live.total.item() == pytest.approx(dense.total.item(), rel=1e-5)
    for field in ("l0", "fve", "mse"):
        assert torch.allclose(getattr(live, field), getattr(dense, field), rtol=1e-5, atol=1e-6)
    assert live.pc.item() == pytest.approx(dense.pc.item(), rel=1e-5, abs=1e-7)
    if quadratic:  # 2/T mean over rows of (L0_row - T)^2, from each row's firing count
        counts = [(model.pre_acts(x, level) > model.threshold[level]).sum(-1).double()
                  for level in range(model.n_levels)]  # fmt: skip
        T = inp.l0_targets.double()
        wanted = sum((2 / T[lv] * (c - T[lv]).pow(2)).mean() for lv, c in enumerate(counts))
    else:
        wanted = (inp.lambdas * dense.l0).sum()
    for out in (live, dense):  # the named terms are the loss, term by term
        assert out.sparsity.item() == pytest.approx(wanted.item(), rel=1e-5)
        parts = out.mse.sum() + out.sparsity + rho * out.pc + out.ghost + out.support
        assert parts.item() == pytest.approx(out.total.item(), rel=1e-5)
        assert (out.ghost.item() != 0) == dead
        assert (out.support.item() != 0) == (support > 0)
    assert live.support.item() == pytest.approx(dense.support.item(), rel=1e-5)
    assert live.ghost.item() == pytest.approx(dense.ghost.item(), rel=1e-5, abs=1e-7)
    assert g_live.keys() == g_dense.keys()
    for name, g in g_dense.items():
        scale = g.abs().max().item()
        assert torch.allclose(g_live[name], g, rtol=1e-4, atol=1e-6 * scale), name
    for a, b in zip(live.fired, dense.fired):
        assert torch.equal(a, b)
    for a, b in zip(live.dense_acts(), dense.dense_acts()):
        assert torch.allclose(a, b, atol=1e-6)
    if sync_free:
        assert live.dropped.item() == 0


def test_capacity_pads_without_changing_the_entries() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    tok, feat, valid, dropped = live_entries(mask, capacity=5)
    assert tok[valid].tolist() == [0, 0, 2] and feat[valid].tolist() == [0, 2, 1]
    assert valid.tolist() == [True, True, True, False, False]
    assert (tok.diff() >= 0).all(), "padding must keep the tokens sorted for embedding_bag"
    assert dropped.item() == 0
    *_, dropped = live_entries(mask, capacity=2)
    assert dropped.item() == 1


def test_capacity_overflow_is_counted() -> None:
    model = _model()
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(6)) * 3
    exact = encode_live(model, x, 2)
    short = encode_live(model, x, 2, capacity=exact.tok.numel() - 7)
    assert short.dropped.item() == 7


def test_exact_live_set_is_every_entry_above_the_window() -> None:
    model = _model()
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(7))
    live = encode_live(model, x, 0)
    pre = model.pre_acts(x, 0).detach()
    expected = (pre > model.threshold[0] - model.bandwidth / 2).nonzero()
    assert torch.equal(torch.stack([live.tok, live.feat], 1), expected)
    assert torch.allclose(live.pre.detach(), pre[live.tok, live.feat], atol=1e-6)
    assert torch.allclose(live.dense().detach(), model.activate(pre, 0), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_step_never_syncs_with_the_host(tmp_path) -> None:
    """Between hierarchy updates a GPU step runs without a host-device sync."""
    from hsae.config import HSAEConfig, RunConfig, TrainConfig
    from hsae.method.train import Trainer

    data = torch.randn(4, 256, 32, device="cuda")
    cfg = RunConfig(
        model=HSAEConfig(sizes=(64, 128, 256), target_l0=8, update_every=5, perturb_rate=0.05),
        train=TrainConfig(steps=100, batch_size=256, checkpoint_every=0, progress=False,
                          scale_tokens=256, device="cuda"),
    )  # fmt: skip
    trainer = Trainer(cfg, 32, lambda start: iter(data), tmp_path)
    trainer.init_fresh()
    for i in range(6):  # past the first hierarchy update: links and substitution are live
        trainer.train_step(data[i % 4])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):  # steps 7-9: no update is due
            trainer.train_step(data[i % 4])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(trainer.dropped) == 0
