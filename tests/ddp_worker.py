"""Run by tests/test_engine.py under torchrun: train the tiny config, then save what each rank holds.

With UNET_TEST_OOM_IN_BACKWARD_RANK=R, rank R's backward fails with a simulated CUDA out-of-memory
error whenever more than one sample goes through (the other ranks never run out of memory).
"""

import os
import sys
from pathlib import Path

import torch

from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent


class OutOfMemoryInBackward(torch.autograd.Function):
    """Passes the loss through, saves the logits as an activation would be, and fails its
    backward with a simulated CUDA out-of-memory error for batches of more than one sample."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        ctx.batch = logits.shape[0]
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return grad, None


def simulate_out_of_memory_in_backward() -> None:
    from unet_trainer.training.losses import DeepSupervisionLoss

    real_loss = DeepSupervisionLoss.forward

    def loss(self, outputs, target):
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        return OutOfMemoryInBackward.apply(real_loss(self, outputs, target), logits)

    DeepSupervisionLoss.forward = loss


if __name__ == "__main__":
    if os.environ.get("UNET_TEST_OOM_IN_BACKWARD_RANK") == os.environ["RANK"]:
        simulate_out_of_memory_in_backward()
    out = Path(sys.argv[1])
    summary = run_training(resolve_config(ROOT / "configs" / "demo.yaml", sys.argv[2:]), progress=False)
    state = summary["state"]
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": state.unwrapped_model.state_dict(),
            "eval_history": state.eval_history,
            "batch": state.timestamp.batch,
            "sample": state.timestamp.sample,
            "auto_microbatch": state.extra_state.get("auto_microbatch"),
        },
        out / f"rank{state.rank}.pt",
    )
