"""Run by tests/test_engine.py under torchrun: train the tiny config, then save what each rank holds."""

import sys
from pathlib import Path

import torch

from unet_trainer.builders import run_training
from unet_trainer.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    out = Path(sys.argv[1])
    summary = run_training(resolve_config(ROOT / "configs" / "demo.yaml", sys.argv[2:]), progress=False)
    state = summary["state"]
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state.unwrapped_model.state_dict(), "eval_history": state.eval_history,
                "batch": state.timestamp.batch, "sample": state.timestamp.sample},
               out / f"rank{state.rank}.pt")
