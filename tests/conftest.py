"""Shared fixtures for the training, CLI and end-to-end tests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TINY_FOREST_FLAGS = [
    "--planted.d", "16",
    "--planted.n_trees", "3",
    "--planted.branching", "2",
    "--planted.depth", "2",
    "--planted.n_independent", "4",
]  # fmt: skip
TINY_RUN_FLAGS = [*TINY_FOREST_FLAGS, "--eval_tokens", "0", "--quiet"]
"""A tiny planted forest and a quiet run without evaluation, for CLI runs in tests."""


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (2 shared cores: more threads only contend)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for `python -m hsae` children: one thread, so results are deterministic."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # The child must import this checkout's hsae even if it is run from another directory.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def write_npy(tmp_path):
    """write_npy(name, n, d, seed=0, bad_row=None, bad_value=nan) -> path of a float32 .npy."""

    def make(name: str, n: int, d: int, seed: int = 0, bad_row=None, bad_value=float("nan")):
        rows = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
        if bad_row is not None:
            rows[bad_row, d // 2] = bad_value
        path = tmp_path / name
        np.save(path, rows)
        return path

    return make


@pytest.fixture(scope="session")
def leftovers():
    """leftovers(root) -> every path under root whose name marks an unfinished atomic write."""

    def find(root: Path) -> list[Path]:
        return [p for p in Path(root).rglob("*") if ".tmp" in p.name or ".old" in p.name]

    return find


def flip_signs(path: Path, name: str, count: int) -> None:
    """Flip the sign bit of the first `count` float32 values of tensor `name`, in place."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0]
    for k in range(count):
        data[start + 4 * k + 3] ^= 0x80
    path.write_bytes(bytes(data))
