"""The training curve: `train_log.jsonl` in the run directory, and optionally Weights & Biases.

One JSON object per logged step (every `TrainConfig.log_every` steps and the last):
step, tokens, lr, the loss and its named terms (reconstruction, sparsity = sum_l lambda_l
L0_l, pc = rho L_PC, ghost, support = s sum_l lambda_l+1 L_S,l), and per level L0, FVE,
lambda and the dead fraction, with the throughput since the previous line.

Each line goes out in one write, flushed and fsynced, so a run killed at any moment leaves
whole lines and at most one torn last line. A resumed run keeps the lines up to its
checkpoint's step (dropping a torn one) and appends from there: the file then reads as if
the run had never stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hsae import io

LOG_FILE = "train_log.jsonl"


def read_log(path: str | Path) -> list[dict]:
    """The whole lines of a training log (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the tail of a killed run
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


class TrainLog:
    """Appends records to ``run_dir/train_log.jsonl`` (and to W&B when asked)."""

    def __init__(self, run_dir: Path, resume_step: int | None, wandb_config: dict | None = None):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / LOG_FILE
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_log(self.path) if r["step"] <= resume_step]
        # a fresh run starts an empty log; a resumed one keeps its steps up to the checkpoint
        io.atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self.file = open(self.path, "a")  # noqa: SIM115 (open for the run's life)
        self.wandb = _start_wandb(run_dir, wandb_config) if wandb_config is not None else None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, default=float) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.wandb is not None:
            self.wandb.log(_flat(record), step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, config: dict):
    try:
        import wandb
    except ImportError:
        raise ValueError("--train.log wandb needs: pip install wandb") from None
    # the run directory's name is the W&B run's id: a resumed run continues the same curve
    run_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(run_dir).name)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "hsae"), id=run_id,
                      name=Path(run_dir).name, dir=str(run_dir), config=config,
                      resume="allow")  # fmt: skip


def _flat(record: dict) -> dict:
    """Per-level lists as "l0/0", "l0/1", ... (W&B plots scalars)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, list):
            out |= {f"{key}/{i}": v for i, v in enumerate(value)}
        else:
            out[key] = value
    return out
