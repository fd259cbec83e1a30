"""SAEBench's core evaluation on each level of an HSAE, on a tiny offline language model.

A 2-block GPT-2 (d = 32) is trained for a few seconds on a toy language, its layer-1
activations are cached with `hsae cache`'s code and an HSAE is trained on them. The same
weights are loaded into TransformerLens, and SAEBench's core evaluation runs on every
exported level. Its numbers are checked against ours, computed on the Hugging Face model
with our own extraction and our HSAE: L0, variance explained and the spliced
cross-entropy on the very tokens SAEBench drew. A hand-built identity level and an
all-zero level pin down the two ends of CE / KL recovered.
"""

from __future__ import annotations

import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("sae_bench.evals.core.main")  # installed --no-deps: see the Makefile
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights  # noqa: E402

from hsae import pipeline, trained_dir  # noqa: E402
from hsae.cli import main  # noqa: E402
from hsae.config import ConfigError, HSAEConfig, RunConfig, TrainConfig  # noqa: E402
from hsae.data import extract as ex  # noqa: E402
from hsae.interop import saebench  # noqa: E402
from hsae.trained import TrainedHSAE  # noqa: E402

D, LAYER, CONTEXT = 32, 1, 32
N_TOPICS, N_CHILDREN = 12, 6
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CORE = {"context_size": CONTEXT, "batch_prompts": 8, "recon_batches": 2, "sparsity_batches": 3}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ---------------------------------------------------------------- a tiny world, built offline


def toy_texts(n: int, seed: int) -> list[str]:
    """Sentences of a topic word followed by words only that topic uses: learnable in seconds."""
    rng = random.Random(seed)

    def sentence() -> str:
        topic = rng.randrange(N_TOPICS)
        kids = [f"c{topic}_{rng.randrange(N_CHILDREN)}" for _ in range(rng.randrange(2, 7))]
        return " ".join([f"t{topic}", *kids, "."])

    return [" ".join(sentence() for _ in range(rng.randrange(3, 8))) for _ in range(n)]


def word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"t{t}" for t in range(N_TOPICS)] + ["."]
    words += [f"c{t}_{c}" for t in range(N_TOPICS) for c in range(N_CHILDREN)]
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>",
    )  # fmt: skip
    fast.save_pretrained(path)  # TransformerLens re-loads it by name_or_path
    return transformers.AutoTokenizer.from_pretrained(path)


def train_gpt2(tok, texts: list[str]):
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=D, n_layer=2,
                                  n_head=4, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    stream = [t for text in texts for t in [tok.bos_token_id, *tok(text)["input_ids"]]]
    rows = torch.tensor(stream[: len(stream) // CONTEXT * CONTEXT]).view(-1, CONTEXT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        batch = rows[torch.randint(0, rows.shape[0], (16,), generator=gen)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def lens_copy(hf, tok) -> HookedTransformer:
    """The same weights as a TransformerLens model, unprocessed (SAEBench's loading)."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D, d_head=D // 4, n_heads=4, d_mlp=4 * D, n_ctx=64,
        d_vocab=len(tok), act_fn="gelu_new", normalization_type="LN",
        original_architecture="GPT2LMHeadModel", default_prepend_bos=True,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)  # fmt: skip
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("saebench")
    tok = word_tokenizer(root / "tok")
    hf = train_gpt2(tok, toy_texts(300, seed=0))
    hf.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    (root / "train.txt").write_text("\n\n".join(toy_texts(200, seed=1)))
    req = pipeline.CacheRequest(model=str(root / "lm"), layer=LAYER, text=str(root / "train.txt"),
                                out=str(root / "cache"), context_len=CONTEXT, batch_size=32,
                                max_tokens=10**6, shard_tokens=4096)  # fmt: skip
    pipeline.cache_activations(req, progress=False)
    cfg = RunConfig(
        model=HSAEConfig(sizes=(32, 64, 128), target_l0=6, update_every=50),
        train=TrainConfig(steps=300, batch_size=256, lr=3e-3, lambda_init=0.1,
                          scale_tokens=2048, checkpoint_every=0, progress=False),
    )  # fmt: skip
    pipeline.train(cfg, pipeline.file_source(req.out, 0.05), root / "run")
    held_out = datasets.Dataset.from_dict({"text": toy_texts(80, seed=2)})
    lm = ex.load_lm(root / "lm")
    return {"root": root, "tok": tok, "lm": lm, "lens": lens_copy(lm.model, tok),
            "run": root / "run", "data": held_out}  # fmt: skip


def spied_core_eval(saes, world, out):
    """Run core_eval and record the token batches SAEBench drew from its activation store."""
    from sae_lens.training.activations_store import ActivationsStore

    drawn: list[list[torch.Tensor]] = []
    original = ActivationsStore.get_batch_tokens

    def record(store, *args, **kwargs):
        tokens = original(store, *args, **kwargs)
        if not drawn or drawn[-1][0] is not store:
            drawn.append([store])
        drawn[-1].append(tokens.clone())
        return tokens

    from_sae = ActivationsStore.from_sae

    def opened(*args, **kwargs):
        # a dataset's own loading script runs only when the user opts in
        assert kwargs.get("dataset_trust_remote_code") is False
        return from_sae(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ActivationsStore, "get_batch_tokens", record)
        mp.setattr(ActivationsStore, "from_sae", opened)
        results = saebench.core_eval(saes, world["lens"], world["data"], out,
                                     dataset_name="toy", progress=False, **CORE)  # fmt: skip
    return results, [batches[1:] for batches in drawn]


# ---------------------------------------------------------------- our side of the numbers


def special_mask(tokens: torch.Tensor, tok) -> torch.Tensor:
    ids = torch.tensor([tok.pad_token_id, tok.eos_token_id, tok.bos_token_id])
    return ~torch.isin(tokens, ids)


@torch.no_grad()
def our_l0_and_fve(world, model, level: int, batches) -> tuple[float, float]:
    """Mean L0 and SAEBench's legacy variance explained (per token, batch-mean centred),
    from our extraction of the Hugging Face model and our HSAE."""
    l0s, fves = [], []
    for tokens in batches:
        mask = special_mask(tokens, world["tok"])
        x = ex.layer_activations(world["lm"], tokens, torch.ones_like(tokens), LAYER)[mask]
        acts = model.encode(x * model.scale)[level]
        x_hat = model.decode(acts, level) / model.scale
        l0s.append((acts != 0).sum(-1).float())
        resid = (x - x_hat).pow(2).sum(-1)
        fves.append(1 - resid / (x - x.mean(0)).pow(2).sum(-1))
    return torch.cat(l0s).mean().item(), torch.cat(fves).mean().item()


@torch.no_grad()
def our_spliced_ce(world, replace, batches) -> float:
    """Next-token CE of the Hugging Face model with block LAYER's output replaced at
    non-special positions by ``replace(x)``, averaged over positions whose input token is
    not special (SAEBench's masking); ``replace=None`` is the clean model."""
    hf, tok = world["lm"].model, world["tok"]
    losses = []
    for tokens in batches:
        mask = special_mask(tokens, tok)

        def hook(_module, _args, out, mask=mask):
            hidden = out[0] if isinstance(out, tuple) else out
            new = torch.where(mask[..., None], replace(hidden), hidden)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = ex.find_blocks(hf)[LAYER - 1].register_forward_hook(hook) if replace else None
        try:
            logits = hf(tokens).logits
        finally:
            if handle is not None:
                handle.remove()
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
        )
        losses.append(ce[mask[:, :-1].flatten()])
    return torch.cat(losses).mean().item()


# ---------------------------------------------------------------- tests


def test_hook_name_reads_what_hsae_cache_reads(world):
    """`hsae cache --layer k` and TransformerLens's hook_name(k) are the same vector."""
    tokens = torch.tensor([world["tok"]("<bos> " + world["data"][0]["text"])["input_ids"]])
    tokens = tokens[:, :CONTEXT]
    _, cache = world["lens"].run_with_cache(tokens)
    for layer in (0, 1, 2):
        ours = ex.layer_activations(world["lm"], tokens, torch.ones_like(tokens), layer)
        assert torch.allclose(cache[saebench.hook_name(layer)], ours, atol=1e-5), layer
    assert saebench.hook_name(14) == "blocks.13.hook_resid_post"


def test_metadata_comes_from_the_training_cache(world):
    meta = saebench.level_metadata(world["run"] / "model")
    assert meta["model_name"] == str(world["root"] / "lm")  # no TransformerLens alias
    assert meta["hook_name"] == "blocks.0.hook_resid_post" and meta["hook_layer"] == 0
    assert meta["context_size"] == CONTEXT and meta["prepend_bos"] is True
    flags = saebench.level_metadata(world["run"] / "model", "gpt2", "blocks.1.hook_resid_post")
    assert flags["model_name"] == "gpt2" and flags["hook_layer"] == 1
    assert saebench.lens_model_name("google/gemma-2-2b") == "gemma-2-2b"
    assert saebench.lens_model_name("EleutherAI/pythia-70m-deduped") == "pythia-70m-deduped"
    assert saebench.lens_model_name("someone/unknown-model") == "someone/unknown-model"


def test_core_eval_matches_our_measures_on_every_level(world, tmp_path):
    saes = saebench.load_levels(world["run"], device="cpu")
    assert [s.cfg.d_sae for _, s in saes] == [32, 64, 128]
    results, drawn = spied_core_eval(saes, world, tmp_path)
    model = TrainedHSAE.load(world["run"]).model
    clean = None
    for level, (name, _) in enumerate(saes):
        saved = json.loads((tmp_path / f"{name}_custom_sae_eval_results.json").read_text())
        assert saved["eval_type_id"] == "core"
        assert saved["sae_cfg_dict"]["d_sae"] == model.sizes[level]
        metrics = saved["eval_result_metrics"]
        n_recon = CORE["recon_batches"]
        recon, sparsity = drawn[level][:n_recon], drawn[level][n_recon:]
        assert len(sparsity) == CORE["sparsity_batches"]

        l0, fve = our_l0_and_fve(world, model, level, sparsity)
        assert 1 < l0 < model.sizes[level] / 2
        assert metrics["sparsity"]["l0"] == pytest.approx(l0, rel=1e-5)
        quality = metrics["reconstruction_quality"]
        assert quality["explained_variance_legacy"] == pytest.approx(fve, abs=1e-4)

        def spliced(h, level=level):
            return model.decode(model.encode(h * model.scale)[level], level) / model.scale

        perf = metrics["model_performance_preservation"]
        clean = our_spliced_ce(world, None, recon)
        assert perf["ce_loss_without_sae"] == pytest.approx(clean, rel=1e-4)
        assert perf["ce_loss_with_sae"] == pytest.approx(our_spliced_ce(world, spliced, recon),
                                                         rel=1e-4)  # fmt: skip
        assert results[name]["sparsity"]["l0"] == metrics["sparsity"]["l0"]
    # the tiny LM learned something: zero-ablating its layer costs a lot of loss
    assert perf["ce_loss_with_ablation"] > clean + 0.5


def _identity_and_zero(directory, scale: float = 0.5) -> None:
    """Level 0 reproduces x exactly (features relu(x) and relu(-x)); level 1 never fires."""
    eye = torch.eye(D)
    identity = trained_dir.LevelWeights(torch.cat([eye, -eye], 1) / scale, torch.zeros(2 * D),
                               torch.cat([eye, -eye], 0) * scale, torch.zeros(D),
                               torch.zeros(2 * D))  # fmt: skip
    never = trained_dir.LevelWeights(torch.randn(D, 4 * D), torch.zeros(4 * D),
                            torch.nn.functional.normalize(torch.randn(4 * D, D), dim=1),
                            torch.zeros(D), torch.full((4 * D,), 1e9))  # fmt: skip
    parents = [torch.arange(4 * D) % (2 * D)]
    trained_dir.save_trained(directory, [identity, never], parents, scale, {}, {})


def test_identity_level_recovers_everything_and_a_dead_level_nothing(world, tmp_path):
    _identity_and_zero(tmp_path / "model")
    saes = saebench.load_levels(tmp_path / "model", model_name="tiny",
                                hook="blocks.0.hook_resid_post")  # fmt: skip
    results, drawn = spied_core_eval(saes, world, tmp_path / "out")
    ident, dead = (results[name] for name, _ in saes)
    assert ident["sparsity"]["l0"] == pytest.approx(D, abs=0.01)  # one of x_i, -x_i is > 0
    fve = ident["reconstruction_quality"]["explained_variance_legacy"]
    assert fve == pytest.approx(1, abs=1e-5)
    assert ident["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1, abs=1e-4)
    assert ident["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1, abs=1e-4)
    assert dead["sparsity"]["l0"] == 0
    # its reconstruction is b_dec = 0 at every ordinary token: about as bad as zero ablation
    # (which zeroes the special tokens too), and exactly our zero splice
    dead_perf = dead["model_performance_preservation"]
    recon = drawn[1][: CORE["recon_batches"]]
    assert dead_perf["ce_loss_with_sae"] == pytest.approx(
        our_spliced_ce(world, torch.zeros_like, recon), rel=1e-4
    )
    assert abs(dead_perf["ce_loss_score"]) < 0.2
    assert abs(dead["model_behavior_preservation"]["kl_div_score"]) < 0.2


def test_command_runs_core_and_writes_the_summary(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(saebench, "load_lens_model", lambda name, device, dtype: world["lens"])
    (tmp_path / "held_out.txt").write_text("\n\n".join(world["data"]["text"]))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in CORE.items()]
    out = tmp_path / "bench"
    code = main(["saebench", str(world["run"]), "--out", str(out), "--device", "cpu",
                 "--dataset", str(tmp_path / "held_out.txt"), "--levels", "0,2", "--quiet",
                 *flags])  # fmt: skip
    assert code == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["sae"] for r in rows] == ["hsae_run_level0_32", "hsae_run_level2_128"]
    for row in rows:
        path = out / "core" / f"{row['sae']}_custom_sae_eval_results.json"
        saved = json.loads(path.read_text())
        assert row["L0"] == saved["eval_result_metrics"]["sparsity"]["l0"] > 0
        assert row["Absorp."] is None
    printed = capsys.readouterr().out
    assert "hsae_run_level2_128" in printed and "Var.Exp." in printed
    # the right hook: SAEBench's activations have the training cache's mean norm
    norms = next(line for line in printed.splitlines() if line.startswith("mean activation"))
    bench, cached = (float(part.split()[-1]) for part in norms.split(","))
    assert bench == pytest.approx(cached, rel=0.1) and "far apart" not in norms


@pytest.mark.parametrize(
    "args,message",
    [
        (["--evals", "core,bogus"], "unknown ['bogus']"),
        (["--evals", "autointerp"], "OPENAI_API_KEY"),
        (["--levels", "7"], "level 7 out of range"),
        (["--levels", "0,x"], "comma-separated integers"),
        (["--hook", "resid"], "not a TransformerLens block hook"),
    ],
)
def test_bad_requests_are_one_line_errors(world, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code = main(["saebench", str(world["run"]), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("hsae: error:") and len(err.splitlines()) == 1
    assert message in err
    assert not (tmp_path / "o").exists()


def test_missing_saebench_is_a_one_line_error(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_bench.evals.core.main", None)  # import fails
    assert main(["saebench", str(world["run"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'hsae[saebench]'" in err and len(err.splitlines()) == 1


def test_a_model_not_trained_on_a_cache_needs_model_and_hook(tmp_path):
    _identity_and_zero(tmp_path / "model")
    with pytest.raises(ConfigError, match="pass --model NAME and --hook"):
        saebench.load_levels(tmp_path / "model")


@pytest.mark.parametrize(
    "kind,column,value,shown",
    [
        ("absorption", "Absorp.", 0.25, 0.75),  # the paper reports 1 - absorption
        ("ravel", "RAVEL", 0.6, 0.6),
        ("scr", "SCR", 0.3, 0.3),
        ("sparse_probing", "SparseProb", 0.87, 0.87),
    ],
)
def test_other_evals_get_saebench_configs_and_land_in_the_summary(
    world, tmp_path, monkeypatch, kind, column, value, shown
):
    """The dispatch builds SAEBench's own config for each eval (its pydantic checks run) and
    the summary finds the result where SAEBench's run_eval writes it. The evals themselves
    need gemma-2-2b and their datasets: they run on a GPU machine (docs/saebench.md)."""
    from sae_bench.sae_bench_utils.general_utils import get_results_filepath

    module = saebench.eval_module(kind)
    category, metric = next((c, m) for col, _, c, m in saebench.TABLE1 if col == column)
    calls = []

    def fake_run_eval(config, saes, device, *args, **kwargs):
        calls.append(config)
        out = os.path.join(args[0], "scr") if kind == "scr" else args[0]  # as run_eval does
        os.makedirs(out, exist_ok=True)
        for name, _ in saes:
            result = {"eval_result_metrics": {category: {metric: value}}}
            with open(get_results_filepath(out, name, "custom_sae"), "w") as f:
                json.dump(result, f)

    monkeypatch.setattr(module, "run_eval", fake_run_eval)
    saes = saebench.load_levels(world["run"], levels=[1])
    saebench.other_eval(kind, saes, "gemma-2-2b", tmp_path, "cpu", "bfloat16", 32, None)
    assert calls[0].model_name == "gemma-2-2b" and calls[0].llm_dtype == "bfloat16"
    assert calls[0].random_seed == saebench.RANDOM_SEED
    (row,) = saebench.summary(tmp_path, [saes[0][0]])
    assert row[column] == pytest.approx(shown) and row["L0"] is None
