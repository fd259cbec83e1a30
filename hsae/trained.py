"""A trained HSAE as every reader sees it: the model, its forest, and what it was trained on.

`TrainedHSAE.load` takes a trained directory or a run directory holding one in model/
(`trained_directory` is the one place that resolves which). The model encodes and decodes
raw activations with its input scale applied inside (`HSAE.encode_raw`,
`HSAE.reconstruct_raw`); the config and the training data's description come from the
one header every writer wrote (`trained_dir.save_trained`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hsae import io, trained_dir
from hsae.method.model import HSAE
from hsae.trained_dir import LEVEL_KEYS, LevelWeights

MODEL_DIR = "model"
"""A run directory keeps its trained directory here (beside the checkpoint)."""
HEADER_FILE = "hsae.json"
HIERARCHY_FILE = "hierarchy.json"
LEGACY_BANDWIDTH = 0.05
"""The straight-through width of directories written before the config recorded it."""


def trained_directory(path: str | Path) -> Path:
    """The trained directory ``path`` names: itself, or the model/ of a run directory."""
    path = Path(path)
    if (path / MODEL_DIR / HEADER_FILE).is_file():
        return path / MODEL_DIR
    if not (path / HEADER_FILE).is_file():
        raise io.FormatError(f"{path}: not a trained HSAE directory (no {HEADER_FILE})")
    return path


def read_header(path: str | Path) -> dict:
    """The header (hsae.json) of the trained model ``path`` names, without its weights."""
    return io.load_json(trained_directory(path) / HEADER_FILE)


def data_of(config: dict) -> dict:
    """What a run was trained on, from its config: {"kind": "planted" | "npy" | "cache",
    ...}, or {} for a directory that does not say (post hoc forests)."""
    return config.get("data", {})


def level_weights(model: HSAE) -> list[LevelWeights]:
    """The model's levels as the on-disk layout holds them (scaled space)."""
    return [
        LevelWeights(**{name: getattr(model, name)[level].detach() for name in LEVEL_KEYS})
        for level in range(model.n_levels)
    ]


def model_from_levels(levels: list[LevelWeights], bandwidth: float, scale: float) -> HSAE:
    """An HSAE holding ``levels`` (the inverse of `level_weights`)."""
    d_in = int(levels[0].W_enc.shape[0])
    model = HSAE(d_in, tuple(int(w.W_enc.shape[1]) for w in levels), bandwidth)
    with torch.no_grad():
        for index, level in enumerate(levels):
            for name in LEVEL_KEYS:
                getattr(model, name)[index].copy_(getattr(level, name))
        model.scale.fill_(scale)
    return model


@dataclass
class TrainedHSAE:
    """A trained HSAE directory in memory."""

    model: HSAE
    parents: list[Tensor]
    """parents[l][j]: the level-l parent of feature j of level l + 1, or -1."""
    config: dict = field(default_factory=dict)
    """The run's config ("model", "train") and "data", what it was trained on."""
    summary: dict = field(default_factory=dict)
    directory: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> TrainedHSAE:
        directory = trained_directory(path)
        levels, parents, scale, header = trained_dir.load_trained(directory)
        config = header.get("config", {})
        bandwidth = config.get("model", {}).get("bandwidth", LEGACY_BANDWIDTH)
        model = model_from_levels(levels, bandwidth, scale)
        return cls(model, parents, config, header.get("summary", {}), directory)

    def save(self, directory: str | Path, **sae_metadata) -> None:
        """Write the trained directory as one unit (`trained_dir.save_trained`)."""
        trained_dir.save_trained(directory, level_weights(self.model), self.parents,
                        float(self.model.scale), self.config, self.summary,
                        sae_metadata=sae_metadata or None)  # fmt: skip
        self.directory = Path(directory)

    @property
    def data(self) -> dict:
        return data_of(self.config)

    @property
    def sizes(self) -> list[int]:
        return list(self.model.sizes)

    @property
    def d_in(self) -> int:
        return self.model.d_in

    def fingerprint(self) -> str:
        """SHA-256 of the header and the forest on disk: names this trained model wherever
        its directory is moved (a context store records it)."""
        if self.directory is None:
            raise ValueError("a model not loaded from or saved to disk has no fingerprint")
        digest = hashlib.sha256()
        for name in (HEADER_FILE, HIERARCHY_FILE):
            digest.update((self.directory / name).read_bytes())
        return digest.hexdigest()
