"""End to end on a planted forest: train an HSAE with `hsae.pipeline`, evaluate it, score its
hierarchy against the planted one, and reload the saved directory.

How the planted forest and the run were chosen (measured on training seeds 0-5):

* depth 2 (roots and their children), p_descend = 0.5 so that a root also fires alone half
  of the time (otherwise its direction never appears on its own and the SAEs learn
  root+child blends that match nothing), geometry form with offset 1.0 (cos(parent,
  child) = 0.71, far enough apart for the 0.9 cosine match to tell them apart), and few
  independent features, so that level 0 (8 features) has room for exactly the 6 roots
  and 2 independents;
* target L0 3.5, just above the true number of active features per token (about 2 roots
  + 1 child + 0.5 independent), decoder similarity (a child's direction is near its
  parent's) and a full tree (no unassigned quantile: a true child's similarity to its
  parent, 0.71, is below that of the many duplicates and would be cut first);
* 2000 steps of 512 tokens, about 5 s on one thread. Longer runs make the fine levels
  absorb children into root+child blends and edge recall falls (see the report);
* the training recipe these margins were measured with (OLD_RECIPE: the narrow
  straight-through window, thresholds at lr, fixed short-run controller constants, the
  cosine schedule). The
  default recipe trains better dictionaries (docs/training.md) but, with the paper's link
  rule, links few true parent -> child pairs on this forest (recall 0.00-0.17, seeds 0-4).

The default method (links by P(parent fires | child fires)) needs no recipe of its own:
with every default of `hsae train` it recalls 0.67-0.92 of the true pairs on seeds 0-4
(test_the_default_method_recovers_the_planted_pairs).
"""

from __future__ import annotations

import math

import pytest
import torch

from hsae import pipeline
from hsae.config import HSAEConfig, RunConfig, TrainConfig
from hsae.data.planted import PlantedConfig, score_against_truth
from hsae.io import load_json
from hsae.trained import TrainedHSAE

FOREST = dict(
    d=32,
    n_trees=6,
    branching=2,
    depth=2,
    n_independent=2,
    independent_rate_total=0.5,
    p_descend=0.5,
    geometry_offset=1.0,
    form="geometry",
    seed=0,
)
TARGET_L0 = 3.5
SIZES = (8, 20, 40)
OLD_RECIPE = dict(
    lr=3e-3,
    threshold_lr=3e-3,
    lambda_init=0.1,
    eta=0.005,
    l0_ema_momentum=0.99,
    scale_to_length=False,
    schedule="cosine",
)
EVAL_TOKENS = 16384
N_SHUFFLES = 20


def run_config(seed: int = 0) -> RunConfig:
    steps = 2000
    return RunConfig(
        model=HSAEConfig(
            sizes=SIZES,
            target_l0=TARGET_L0,
            similarity="decoder",
            unassigned_quantile=0.0,
            bandwidth=0.05,
            decoder_init_norm=0.0,  # unit rows and a fixed window, as measured
            window="fixed",
            update_every=steps // 10,
        ),
        train=TrainConfig(
            steps=steps,
            **OLD_RECIPE,
            batch_size=512,
            dead_after=200,
            checkpoint_every=500,
            scale_tokens=8192,
            progress=False,
            seed=seed,
        ),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("e2e")
        source = pipeline.planted_source(PlantedConfig(**FOREST))
        result = pipeline.train(run_config(), source, out)
        report = pipeline.evaluate_model(
            result.model, result.hierarchy.parents, source, EVAL_TOKENS
        )
    finally:
        torch.set_num_threads(before)
    return {"out": out, "source": source, "result": result, "report": report}


def random_parent_scores(forest, decoders, parents, n: int = N_SHUFFLES) -> dict:
    """The learned parent arrays shuffled (same tree shape, links at random), scored.

    Pooled over n shuffles with a fixed seed: precision = all ancestor edges / all judged
    edges, recall = the mean recall."""
    gen = torch.Generator().manual_seed(12345)
    ancestor = judged = consistent = matched = 0
    recalls = []
    for _ in range(n):
        shuffled = [p[torch.randperm(p.numel(), generator=gen)] for p in parents]
        s = score_against_truth(forest, decoders, shuffled)
        ancestor += s["ancestor"]
        judged += s["ancestor"] + s["wrong"]
        consistent += s["ancestor"] + s["duplicate"]
        matched += s["ancestor"] + s["duplicate"] + s["wrong"]
        recalls.append(s["recall"])
    return {
        "precision": ancestor / judged if judged else 0.0,
        "recall": sum(recalls) / len(recalls),
        "consistent": consistent / matched if matched else 0.0,
    }


@pytest.mark.slow
def test_recovers_planted_features_and_edges(trained):
    report, source, result = trained["report"], trained["source"], trained["result"]
    forest = source.forest
    decoders = [w.detach() for w in result.model.W_dec]
    parents = result.hierarchy.parents
    truth = score_against_truth(forest, decoders, parents)
    # evaluate_model reports the same ground-truth scores
    assert report["recovered"] == truth["recovered"]
    assert report["recall"] == truth["recall"]

    # Every level's L0 within 15 % of the target (the controller's job; seeds 0-4: < 2 %).
    for level, l0 in enumerate(report["l0"]):
        assert abs(l0 - TARGET_L0) <= 0.15 * TARGET_L0, (level, report["l0"])

    # True features recovered (best cosine >= 0.9) at every level. Seeds 0-4 recover 6-8
    # at level 0 (of 6 roots + 2 independents) and 7-13 at the finer levels; a random
    # 32-d unit vector reaches cosine 0.9 with a given direction with probability ~1e-12.
    assert all(n >= 4 for n in report["recovered"]), report["recovered"]
    roots = torch.arange(FOREST["n_trees"])
    level0 = truth["matches"][0]
    assert int(torch.isin(roots, level0).sum()) >= 4, "level 0 should hold most roots"

    rnd = random_parent_scores(forest, decoders, parents)

    # Links agree with the truth: of the learned edges whose two ends both match a true
    # feature, the parent's match is the child's own feature (a coarser copy) or an
    # ancestor of it. Seeds 0-4: 94-100 %; the same links shuffled: 11-15 %.
    matched = truth["ancestor"] + truth["duplicate"] + truth["wrong"]
    assert matched >= 10
    consistent = (truth["ancestor"] + truth["duplicate"]) / matched
    assert consistent >= 0.85, truth
    assert consistent >= rnd["consistent"] + 0.4, (consistent, rnd)

    # True parent -> child edges. Seeds 0-4 give 1-4 ancestor edges, precision 0.5-1.0
    # (shuffled: 0.02-0.06) and recall 0.083-0.42 of the 12 true edges (shuffled:
    # 0.02-0.11). These margins hold on seeds 0-4, the recall one only just (one edge on
    # seeds 3 and 4). Seed 5 finds no true edge at all (8 duplicates, 2 wrong): edge
    # recovery at this scale is fragile, which this test pins down at seed 0.
    assert truth["ancestor"] >= 1, truth
    assert truth["edge_precision"] >= 0.5
    assert truth["edge_precision"] >= rnd["precision"] + 0.3, (truth["edge_precision"], rnd)
    assert truth["recall"] > rnd["recall"] + 0.04, (truth["recall"], rnd)


def default_run_config(seed: int = 0, method: str = "hsae") -> RunConfig:
    """The same forest and sizes with every default of `hsae train`: no recipe of its own."""
    steps = 2000
    return RunConfig(
        model=HSAEConfig(method=method, sizes=SIZES, target_l0=TARGET_L0, update_every=steps // 10),
        train=TrainConfig(steps=steps, batch_size=512, checkpoint_every=0, scale_tokens=8192,
                          progress=False, seed=seed),
    )  # fmt: skip


@pytest.mark.slow
def test_the_default_method_recovers_the_planted_pairs(tmp_path):
    """The default method, with every training default, on the planted forest above.

    Measured on seeds 0-4 (decoder rows from 0.1, free, the encoder window, no
    substitution; 2026-12-03): recall 0.92, 0.83, 0.75, 0.67, 0.75 of the 12 true pairs
    (shuffled links 0.08-0.14) and edge precision 1.00 on every seed (shuffled
    0.06-0.11). With the paper's substitution at r = 0.05, the default before, recall
    0.75-0.92 and precision 0.79-1.00; without both the substitution and L_PC, recall
    0.17-0.33 (docs/hierarchy.md). The paper's method with the same defaults: recall
    0.00-0.17. The margins below hold on every one of those seeds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = pipeline.planted_source(PlantedConfig(**FOREST))
        result = pipeline.train(default_run_config(), source, tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    decoders = [w.detach() for w in result.model.W_dec]
    parents = result.hierarchy.parents
    truth = score_against_truth(source.forest, decoders, parents)
    rnd = random_parent_scores(source.forest, decoders, parents)
    assert truth["recall"] >= 0.6, truth
    assert truth["recall"] >= rnd["recall"] + 0.4, (truth["recall"], rnd)
    assert truth["edge_precision"] >= 0.75, truth
    assert truth["edge_precision"] >= rnd["precision"] + 0.5, (truth["edge_precision"], rnd)


def test_saved_directory_reloads_with_the_same_weights_and_parents(trained):
    out, result = trained["out"], trained["result"]
    loaded = TrainedHSAE.load(out)
    model, parents = loaded.model, loaded.parents
    trained_model = result.model
    assert loaded.sizes == list(SIZES) and loaded.d_in == FOREST["d"]
    assert loaded.summary["steps"] == 2000
    assert load_json(out / "model" / "hsae.json")["config"]["model"]["target_l0"] == TARGET_L0
    assert float(model.scale) == float(trained_model.scale)
    assert len(parents) == len(result.hierarchy.parents) == len(SIZES) - 1
    for loaded, learned in zip(parents, result.hierarchy.parents, strict=True):
        assert torch.equal(loaded, learned.long())
    scale = float(trained_model.scale)
    exact_scale = math.frexp(scale)[0] == 0.5  # a power of two folds without rounding
    for level in range(len(SIZES)):
        for name in ("b_enc", "threshold"):  # not touched by the scale folding
            assert torch.equal(getattr(model, name)[level], getattr(trained_model, name)[level])
        for name in ("W_enc", "W_dec", "b_dec"):
            got = getattr(model, name)[level].detach()
            want = getattr(trained_model, name)[level].detach()
            if exact_scale:
                assert torch.equal(got, want), (level, name)
            else:
                # trained_dir.fold_scale / unfold_scale: exact up to one float32 rounding
                assert torch.allclose(got, want, rtol=2.5e-7, atol=1e-12), (level, name)
    # And the reloaded model computes what the trained one computes.
    x = next(trained["source"].stream(256, 99)(0)) * scale
    with torch.no_grad():
        for a, b in zip(model.encode(x), trained_model.encode(x), strict=True):
            same = (a > 0) == (b > 0)  # a one-ulp change may flip a pre-activation at theta
            assert same.float().mean() > 0.999
            assert torch.allclose(a[same], b[same], atol=1e-4)
