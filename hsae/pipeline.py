"""From an activation source to a trained, saved and evaluated HSAE: what `hsae train`,
`hsae eval` and `hsae demo` share."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hsae import distributed, io
from hsae.config import ConfigError, RunConfig
from hsae.data.activations import NpyActivations
from hsae.data.planted import PlantedConfig, PlantedForest, score_against_truth
from hsae.data.streams import Stream, npy_stream, planted_heldout, planted_stream
from hsae.metrics import evaluate
from hsae.model import HSAE
from hsae.train import Trainer, TrainResult

MODEL_DIR = "model"


@dataclass
class Source:
    """Where activations come from: a planted forest or a .npy file of shape (N, d)."""

    d: int
    description: dict
    forest: PlantedForest | None = None
    train_rows: NpyActivations | None = None
    eval_rows: NpyActivations | None = None

    def stream(self, batch_size: int, seed: int) -> Stream:
        if self.forest is not None:
            return planted_stream(self.forest, batch_size, seed)
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


def npy_source(path: str, eval_frac: float, expected_d: int | None = None) -> Source:
    rows = NpyActivations(path, expected_d)
    train_rows, eval_rows = rows.split(eval_frac)
    description = {"kind": "npy", "path": str(Path(path).resolve()), "eval_frac": eval_frac}
    return Source(rows.d, description, train_rows=train_rows, eval_rows=eval_rows)


def source_from_description(description: dict, expected_d: int) -> Source:
    """Rebuild the source a model was trained on (its held-out part is used by eval)."""
    if description.get("kind") == "planted":
        return planted_source(PlantedConfig(**description["planted"]))
    if description.get("kind") == "npy":
        return npy_source(description["path"], description["eval_frac"], expected_d)
    raise ConfigError("the model directory does not say what data it was trained on; pass --data")


# ---------------------------------------------------------------- train and save


def train(cfg: RunConfig, source: Source, out_dir: str | Path, resume: bool = False) -> TrainResult:
    """Train (or resume) in out_dir, then write the trained directory out_dir/model.

    Under torchrun every process runs this; each takes its share of every batch and
    rank 0 alone writes."""
    distributed.init_from_env()
    stream = source.stream(cfg.train.batch_size, cfg.train.seed)
    trainer = Trainer(cfg, source.d, stream, out_dir)
    result = trainer.fit(resume=resume)
    if distributed.is_main():
        save(result, cfg, source, Path(out_dir) / MODEL_DIR)
    distributed.barrier()
    return result


def save(result: TrainResult, cfg: RunConfig, source: Source, directory: Path) -> None:
    model = result.model
    config = cfg.to_dict() | {"data": source.description}
    io.save_trained(
        directory,
        level_weights(model),
        result.hierarchy.parents,
        float(model.scale),
        config,
        result.summary,
    )


def level_weights(model: HSAE) -> list[io.LevelWeights]:
    return [
        io.LevelWeights(
            *(
                p[level].detach()
                for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec, model.threshold)
            )
        )
        for level in range(model.n_levels)
    ]


def load(directory: str | Path) -> tuple[HSAE, list[Tensor], dict]:
    """A trained directory (or a run directory holding one in model/) as a model."""
    directory = Path(directory)
    if (directory / MODEL_DIR / "hsae.json").exists():
        directory = directory / MODEL_DIR
    levels, parents, scale, header = io.load_trained(directory)
    cfg = header.get("config", {})
    bandwidth = cfg.get("model", {}).get("bandwidth", 0.05)
    model = HSAE(int(header["d_in"]), tuple(header["sizes"]), bandwidth)
    with torch.no_grad():
        for level, w in enumerate(levels):
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                getattr(model, name)[level].copy_(getattr(w, name))
        model.scale.fill_(scale)
    return model, parents, header


# ---------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate_model(
    model: HSAE, parents: list[Tensor], source: Source, n_tokens: int, seed: int = 0
) -> dict:
    """Section 5 measures on held-out tokens; on planted data also the ground-truth scores."""

    def batches():
        for x_raw in source.heldout(n_tokens, 1024, seed):
            x = x_raw.float() * model.scale
            acts = model.encode(x)
            yield x, acts, [model.decode(a, level) for level, a in enumerate(acts)]

    report = evaluate(batches(), parents, list(model.sizes))
    if source.forest is not None:
        truth = score_against_truth(source.forest, [w.detach() for w in model.W_dec], parents)
        report["truth"] = {k: v for k, v in truth.items() if k != "matches"}
        report["recovered"] = truth["recovered"]
        report["edge_precision"] = truth["edge_precision"]
        report["recall"] = truth["recall"]
    return report
