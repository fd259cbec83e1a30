"""Data-parallel training: 2 gloo processes on CPU end where 1 process ends, for the same
global batch (PyTorch DDP averages gradients; hsae syncs L0, firing and initialisation)."""

from __future__ import annotations

import json
import subprocess

import torch
from conftest import TINY_RUN_FLAGS

from hsae.io import load_safetensors

RUN = [
    "--model.sizes", "16,32,64",
    "--model.target_l0", "4",
    "--model.update_every", "10",
    "--train.steps", "30",
    "--train.batch_size", "256",
    "--train.scale_tokens", "1024",
    "--train.checkpoint_every", "10",
    *TINY_RUN_FLAGS,
]  # fmt: skip


def test_two_gloo_processes_match_one(tmp_path, subprocess_env, python_exe):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([python_exe, "-m", "hsae", "train", "--out", str(one), *RUN],
                   env=subprocess_env, check=True, timeout=300)  # fmt: skip
    torchrun = [python_exe, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*torchrun, "-m", "hsae", "train", "--out", str(two), *RUN],
                   env=subprocess_env, check=True, timeout=300, capture_output=True)  # fmt: skip
    for level in range(3):
        a = load_safetensors(one / "model" / f"level_{level}" / "sae_weights.safetensors")
        b = load_safetensors(two / "model" / f"level_{level}" / "sae_weights.safetensors")
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), (level, name)
    headers = [json.loads((d / "model" / "hsae.json").read_text()) for d in (one, two)]
    assert [h["summary"]["world_size"] for h in headers] == [1, 2]  # really data-parallel
    hierarchy = [json.loads((d / "model" / "hierarchy.json").read_text()) for d in (one, two)]
    assert hierarchy[0] == hierarchy[1]
    assert any(p >= 0 for p in hierarchy[0]["parents"][1])  # links were made: not vacuous
    # checkpoints are written once, by rank 0, as one file
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.safetensors", "model"]
