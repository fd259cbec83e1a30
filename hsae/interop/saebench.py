"""SAEBench on every level of a trained HSAE (`hsae saebench`): the paper's Table 1.

Each level of a trained directory is an SAE Lens JumpReLU SAE (design §6), and
SAEBench evaluates SAE Lens SAEs against a TransformerLens model. What this module adds:

* the metadata SAEBench reads and our export leaves empty: the TransformerLens model name
  and hook of the activations the HSAE was trained on, taken from its ``hsae cache``
  manifest (or from flags). ``hsae cache --layer k`` reads the output of block k
  (1-based; 0 is the embeddings), which TransformerLens calls ``blocks.{k-1}.hook_resid_post``
  (``blocks.0.hook_resid_pre`` for k = 0);
* each level loaded with ``SAE.load_from_disk(..., fold_W_dec_norm=True)``, as SAEBench does
  with SAE Lens's pretrained SAEs: unit-norm decoder rows, the same reconstructions and L0;
* SAEBench's core evaluation run exactly as ``sae_bench.evals.core.main.multiple_evals``
  runs it (same config, dataset shuffle, special tokens ignored, JSON), but on a model and a
  dataset passed in, so a test can run it on a tiny offline model;
* the other Table 1 evaluations through SAEBench's own ``run_eval`` with its default
  configs, and a summary table of the paper's metrics (docs/saebench.md).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hsae import io, trained_dir
from hsae.config import ConfigError
from hsae.flags import Command, model_dir_option, option
from hsae.trained import data_of, read_header, trained_directory

RANDOM_SEED = 42  # SAEBench's seed for every eval and for the core eval's dataset shuffle
CORE_DEFAULTS = {"context_size": 128, "batch_prompts": 16, "recon_batches": 200,
                 "sparsity_batches": 2000, "dataset": "Skylion007/openwebtext"}  # fmt: skip
"""What SAEBench's own runner (custom_saes/run_all_evals_custom_saes.py) uses for core."""
CORE_METRICS = ("compute_kl", "compute_ce_loss", "compute_l2_norms", "compute_sparsity_metrics",
                "compute_variance_metrics", "compute_featurewise_density_statistics",
                "compute_featurewise_weight_based_metrics")  # fmt: skip
"""All on, as that runner asks (their defaults in CoreEvalConfig are off)."""
EVALS = ("core", "absorption", "autointerp", "ravel", "scr", "sparse_probing")
"""The evaluations of the paper's Table 1 (core gives its L0 and variance explained)."""
TABLE1 = [  # column, eval, metric category, metric (SAEBench names; paper Table 2)
    ("L0", "core", "sparsity", "l0"),
    ("Var.Exp.", "core", "reconstruction_quality", "explained_variance_legacy"),
    ("CE rec.", "core", "model_performance_preservation", "ce_loss_score"),
    ("KL score", "core", "model_behavior_preservation", "kl_div_score"),
    ("Absorp.", "absorption", "mean", "mean_absorption_fraction_score"),  # shown as 1 - score
    ("AutoInterp", "autointerp", "autointerp", "autointerp_score"),
    ("RAVEL", "ravel", "ravel", "disentanglement_score"),
    ("SCR", "scr", "scr_metrics", "scr_metric_threshold_20"),
    ("SparseProb", "sparse_probing", "sae", "sae_top_5_test_accuracy"),
]
INSTALL_HINT = "SAEBench is not installed: pip install 'hsae[saebench]' (see docs/saebench.md)"


# ---------------------------------------------------------------- metadata and loading


def hook_name(layer: int) -> str:
    """The TransformerLens hook of ``hsae cache --layer layer`` (hidden-state index)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ConfigError(f"layer must be an integer >= 0, got {layer!r}")
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def lens_model_name(name: str) -> str:
    """TransformerLens's short alias of a Hugging Face name if it has one ("google/gemma-2-2b"
    -> "gemma-2-2b"): SAEBench keys its per-model settings by these short names."""
    from transformer_lens.supported_models import MODEL_ALIASES

    short = name.rsplit("/", 1)[-1]
    return short if short in MODEL_ALIASES.get(name, ()) else name


def training_cache(model_dir: Path) -> dict | None:
    """The manifest of the ``hsae cache`` a trained directory was trained on, if it is there."""
    data = data_of(read_header(model_dir).get("config", {}))
    manifest = Path(str(data.get("path", ""))) / "manifest.json"
    if data.get("kind") != "cache" or not manifest.is_file():
        return None
    return io.load_json(manifest)


def training_metadata(model_dir: Path) -> dict[str, Any]:
    """Model, hook, context and text of the training cache; empty without one."""
    meta = (training_cache(model_dir) or {}).get("meta")
    if not meta:
        return {}
    return {"model_name": meta.get("model"), "hook_name": hook_name(meta.get("layer")),
            "context_size": meta.get("context_len"), "dataset_path": meta.get("text")}  # fmt: skip


def norm_check(results: dict[str, dict], manifest: dict) -> str:
    """SAEBench's mean activation norm at the hook beside the training cache's: a wrong hook
    or layer convention shows up as a ratio far from 1."""
    cached = manifest["row_norm_sum"] / max(manifest["n_tokens"], 1)
    bench = next(iter(results.values()))["shrinkage"]["l2_norm_in"]
    line = f"mean activation norm: SAEBench's hook {bench:.4g}, training cache {cached:.4g}"
    if not 0.5 < bench / cached < 2:
        line += " (far apart: check --hook and the model)"
    return line


def level_metadata(
    model_dir: Path, model_name: str | None = None, hook: str | None = None
) -> dict[str, Any]:
    """What SAEBench needs, from flags first, then cfg.json, then the training cache."""
    exported = io.load_json(model_dir / "level_0" / trained_dir.SAE_CFG_FILE).get("metadata", {})
    cached = training_metadata(model_dir)
    meta = {key: exported.get(key) or cached.get(key) for key in
            ("model_name", "hook_name", "context_size", "dataset_path")}  # fmt: skip
    meta["model_name"] = model_name or meta["model_name"]
    meta["hook_name"] = hook or meta["hook_name"]
    if not meta["model_name"] or not meta["hook_name"]:
        raise ConfigError(
            f"{model_dir}: cannot tell which model and hook it was trained on (no hsae cache "
            "manifest); pass --model NAME and --hook blocks.K.hook_resid_post"
        )
    meta["model_name"] = lens_model_name(meta["model_name"])
    meta["hook_layer"] = _hook_layer(meta["hook_name"])
    meta["prepend_bos"] = True  # SAEBench's and SAE Lens's default for every model
    return meta


def _hook_layer(hook: str) -> int:
    parts = hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ConfigError(f"hook {hook!r} is not a TransformerLens block hook (blocks.K.hook_...)")
    return int(parts[1])


def load_levels(
    model_dir: str | os.PathLike,
    model_name: str | None = None,
    hook: str | None = None,
    device: str = "cpu",
    levels: Sequence[int] | None = None,
) -> list[tuple[str, Any]]:
    """(name, SAE Lens SAE) per level, decoder norms folded, with SAEBench's metadata set."""
    from sae_lens import SAE

    model_dir = trained_directory(model_dir)
    sizes = read_header(model_dir)["sizes"]
    meta = level_metadata(model_dir, model_name, hook)
    chosen = range(len(sizes)) if levels is None else levels
    run = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    out = []
    for level in chosen:
        if not 0 <= level < len(sizes):
            raise ConfigError(f"level {level} out of range: the model has {len(sizes)} levels")
        sae = SAE.load_from_disk(str(model_dir / f"level_{level}"), device=device,
                                 fold_W_dec_norm=True)  # fmt: skip
        for key, value in meta.items():
            setattr(sae.cfg.metadata, key, value)
        out.append((f"hsae_{run}_level{level}_{sizes[level]}", sae))
    return out


def sae_bench():
    """SAEBench's core eval module, or a one-line error saying how to install it."""
    try:
        import sae_bench.evals.core.main as core
    except ImportError as err:
        raise ConfigError(f"{INSTALL_HINT} ({io.one_line(err)})") from None
    return core


# ---------------------------------------------------------------- the core evaluation


def core_eval(
    saes: Sequence[tuple[str, Any]],
    model: Any,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    dataset_name: str = CORE_DEFAULTS["dataset"],
    context_size: int = CORE_DEFAULTS["context_size"],
    batch_prompts: int = CORE_DEFAULTS["batch_prompts"],
    recon_batches: int = CORE_DEFAULTS["recon_batches"],
    sparsity_batches: int = CORE_DEFAULTS["sparsity_batches"],
    llm_dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, dict]:
    """SAEBench's core evaluation of each SAE on ``model`` (a HookedTransformer) over
    ``dataset`` (a Hugging Face name or a ``datasets.Dataset`` with a "text" or "tokens"
    column); one SAEBench JSON per SAE in out_dir. Returns name -> SAEBench's metrics."""
    core = sae_bench()
    from sae_bench.sae_bench_utils import general_utils
    from sae_lens.training.activations_store import ActivationsStore

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = model.tokenizer
    ignore = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}
    eval_id, lens_version = core.get_eval_uuid(), core.get_sae_lens_version()
    # SAEBench records its git commit (of the working directory!); name the release instead
    bench_version = f"sae-bench {importlib.metadata.version('sae-bench')}"
    results = {}
    for name, sae in saes:
        sae_id, sae, _ = general_utils.load_and_format_sae(name, sae, device)
        sae = sae.to(device=device, dtype=general_utils.str_to_dtype(llm_dtype))
        config = core.CoreEvalConfig(
            model_name=sae.cfg.model_name, llm_dtype=llm_dtype, batch_size_prompts=batch_prompts,
            n_eval_reconstruction_batches=recon_batches,
            n_eval_sparsity_variance_batches=sparsity_batches, dataset=dataset_name,
            context_size=context_size, exclude_special_tokens_from_reconstruction=True,
            **dict.fromkeys(CORE_METRICS, True),
        )  # fmt: skip
        store = ActivationsStore.from_sae(
            model, sae, dataset=dataset, context_size=context_size,
            dataset_trust_remote_code=trust_remote_code,
            total_tokens=context_size * batch_prompts * (recon_batches + sparsity_batches),
        )  # fmt: skip
        store.shuffle_input_dataset(seed=RANDOM_SEED)
        metrics, features = core.run_evals(sae, store, model, config, ignore_tokens=ignore,
                                           verbose=progress)  # fmt: skip
        metrics["misc_metrics"] = core.calculate_misc_metrics(features)
        result = {"unique_id": f"{name}_{sae_id}", "sae_set": name, "sae_id": sae_id,
                  "eval_cfg": config, "metrics": metrics, "feature_metrics": features}  # fmt: skip
        cleaned = core.replace_nans_with_negative_one(result)
        path = general_utils.get_results_filepath(str(out_dir), name, sae_id)
        with io.replaced_file(path) as tmp:  # never a half-written file
            core.save_single_eval_result(cleaned, eval_id, lens_version, bench_version, str(tmp),
                                         sae)  # fmt: skip
        results[name] = core.replace_nans_with_negative_one(metrics)
    return results


# ---------------------------------------------------------------- the other evaluations


def eval_module(kind: str):
    """SAEBench's module of an evaluation (SCR lives with TPP)."""
    package = "scr_and_tpp" if kind == "scr" else kind
    return importlib.import_module(f"sae_bench.evals.{package}.main")


def other_eval(
    kind: str, saes: list, model_name: str, out: Path, device: str, dtype: str,
    batch_size: int, api_key: str | None,
) -> None:  # fmt: skip
    """One of SAEBench's other Table 1 evaluations, with SAEBench's default config, as its
    runner (custom_saes/run_all_evals_custom_saes.py) calls it; it writes its own JSONs."""
    module = eval_module(kind)
    common = {"model_name": model_name, "random_seed": RANDOM_SEED, "llm_dtype": dtype}
    artifacts = str(out / "artifacts")
    if kind == "absorption":
        cfg = module.AbsorptionEvalConfig(**common, llm_batch_size=batch_size)
        module.run_eval(cfg, saes, device, str(out / kind))
    elif kind == "autointerp":
        cfg = module.AutoInterpEvalConfig(**common, llm_batch_size=batch_size)
        module.run_eval(cfg, saes, device, api_key, str(out / kind), artifacts_path=artifacts)
    elif kind == "ravel":
        cfg = module.RAVELEvalConfig(**common, llm_batch_size=max(1, batch_size // 4))
        module.run_eval(cfg, saes, device, str(out / kind), artifacts_path=artifacts)
    elif kind == "scr":  # run_eval appends "scr" to the output path itself
        cfg = module.ScrAndTppEvalConfig(**common, llm_batch_size=batch_size, perform_scr=True)
        module.run_eval(cfg, saes, device, str(out), clean_up_activations=True,
                        save_activations=False, artifacts_path=artifacts)  # fmt: skip
    elif kind == "sparse_probing":
        cfg = module.SparseProbingEvalConfig(**common, llm_batch_size=batch_size)
        module.run_eval(cfg, saes, device, str(out / kind), clean_up_activations=True,
                        save_activations=False, artifacts_path=artifacts)  # fmt: skip


# ---------------------------------------------------------------- summary


def summary(out: Path, names: Sequence[str]) -> list[dict]:
    """The paper's Table 1 metrics per level, read back from SAEBench's JSON files."""
    rows = []
    for name in names:
        row: dict[str, Any] = {"sae": name}
        for column, kind, category, metric in TABLE1:
            path = out / kind / f"{name}_custom_sae_eval_results.json"
            value = None
            if path.is_file():
                value = io.load_json(path).get("eval_result_metrics", {})
                value = value.get(category, {}).get(metric)
            if column == "Absorp." and value is not None:
                value = 1.0 - value  # the paper reports 1 - absorption (Appendix D)
            row[column] = value
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    columns = [c for c, *_ in TABLE1 if any(r[c] is not None for r in rows)]
    width = max(len(r["sae"]) for r in rows)
    lines = [f"{'level':{width}}  " + "  ".join(f"{c:>10}" for c in columns)]
    for r in rows:
        cells = [f"{r[c]:>10.3f}" if r[c] is not None else f"{'-':>10}" for c in columns]
        lines.append(f"{r['sae']:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------- command


def load_lens_model(name: str, device: str, dtype: str) -> Any:
    """The model as SAEBench loads it: TransformerLens, weights unprocessed."""
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing(
        name, device=device, dtype=str_to_dtype(dtype)
    )


def core_dataset(spec: str) -> Any:
    """A local .txt/.jsonl file or directory (hsae's text sources) as an in-memory dataset;
    anything else is a Hugging Face dataset name, streamed by SAE Lens."""
    if not Path(spec).exists():
        return spec
    import datasets

    from hsae.data.text import text_source

    texts = list(text_source(spec))
    if not texts:
        raise ConfigError(f"{spec}: no texts")
    return datasets.Dataset.from_dict({"text": texts})


def run(args: SaebenchOptions) -> None:
    evals = [e for e in args.evals.replace(" ", "").split(",") if e]
    unknown = sorted(set(evals) - set(EVALS))
    if not evals or unknown:
        raise ConfigError(f"--evals: unknown {unknown or 'none'}; choose from {', '.join(EVALS)}")
    api_key = os.environ.get("OPENAI_API_KEY")
    if "autointerp" in evals and not api_key:
        raise ConfigError("autointerp needs an OpenAI key in the OPENAI_API_KEY variable")
    trained_directory(args.model_dir)  # a wrong path fails before the slow imports
    sae_bench()  # and so does a missing SAEBench
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    saes = load_levels(args.model_dir, args.model, args.hook, device, _levels(args.levels))
    model_name = saes[0][1].cfg.metadata.model_name
    out = Path(args.out)
    if "core" in evals:
        _run_core(args, saes, model_name, device, out / "core")
    for kind in (e for e in evals if e != "core"):
        other_eval(kind, saes, model_name, out, device, args.dtype, args.batch_size,
                   api_key)  # fmt: skip
    rows = summary(out, [name for name, _ in saes])
    io.atomic_write_json(out / "summary.json", rows)
    print(format_summary(rows))
    print(f"wrote {out / 'summary.json'} and SAEBench's JSON per level and eval under {out}")


def _levels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--levels: expected comma-separated integers, got {text!r}") from None


def _run_core(args: SaebenchOptions, saes: list, model_name: str, device: str, out: Path):
    model = load_lens_model(model_name, device, args.dtype)
    results = core_eval(
        saes, model, core_dataset(args.dataset), out, dataset_name=args.dataset,
        context_size=args.context_size, batch_prompts=args.batch_prompts,
        recon_batches=args.recon_batches, sparsity_batches=args.sparsity_batches,
        llm_dtype=args.dtype, device=device, progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    manifest = training_cache(trained_directory(args.model_dir))
    if manifest and "row_norm_sum" in manifest:
        print(norm_check(results, manifest))


@dataclass(kw_only=True)
class SaebenchOptions:
    model_dir: str = model_dir_option()
    out: str = option("saebench_out", "results directory", output="dir")
    evals: str = option("core", f"comma-separated, of: {', '.join(EVALS)}")
    model: str | None = option(None, "TransformerLens model name (default: the training cache's)")
    hook: str | None = option(None, "TransformerLens hook (default: from the training cache)")
    levels: str | None = option(None, "comma-separated level indices (default: all)")
    device: str = option("auto", "cuda, cpu, ... (auto: cuda if present)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "language model dtype")
    batch_size: int = option(32, "language model batch of the non-core evals", low=1)
    dataset: str = option(CORE_DEFAULTS["dataset"], "core eval's text")
    context_size: int = option(CORE_DEFAULTS["context_size"], "core eval, tokens per prompt",
                               low=1)  # fmt: skip
    batch_prompts: int = option(CORE_DEFAULTS["batch_prompts"], "core eval, prompts per batch",
                                low=1)  # fmt: skip
    recon_batches: int = option(CORE_DEFAULTS["recon_batches"], "core eval, batches for the "
                                "reconstruction metrics", low=1)  # fmt: skip
    sparsity_batches: int = option(CORE_DEFAULTS["sparsity_batches"], "core eval, batches for "
                                   "the sparsity metrics", low=1)  # fmt: skip
    trust_remote_code: bool = option(False, "let a Hugging Face dataset run its own loading "
                                     "script")  # fmt: skip
    quiet: bool = option(False, "no progress bars")


COMMANDS = [Command("saebench", "SAEBench's evaluations on each level (paper Table 1)",
                    SaebenchOptions, run)]  # fmt: skip
