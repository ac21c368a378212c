"""The run's metrics lines, read from the device one step late: while step N+1 runs, the host reads step N's loss,
writes its line and places the next batch, so the device never waits for Python between steps."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import IO


class NonFiniteLoss(Exception):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class StepRecords:
    """`add` a dispatched step's metrics; `settle` writes the line of the step added last (waiting for it) and raises
    NonFiniteLoss when its loss is not finite. tokens_per_s and mfu are over the time since the line before (or
    since `restart`: a checkpoint's save or an eval is not counted as a step's time)."""

    def __init__(self, file: IO[str], bar, *, flops_per_token: float, peak_flops: float):
        self.file, self.bar, self.flops_per_token, self.peak_flops = file, bar, flops_per_token, peak_flops
        self.pending: tuple[int, dict, float] | None = None
        self.restart()

    def restart(self) -> None:
        self.since = time.perf_counter()

    def add(self, step: int, metrics: dict, tokens: float) -> None:
        """Step `step`'s metrics (device arrays, not waited for) over `tokens` targets; settles the one before."""
        self.settle()
        self.pending = (step, metrics, tokens)

    def settle(self, eval_loss: Callable[[], float] | None = None) -> None:
        """Write the pending step's line (with `eval_loss()` when given), if there is one."""
        if self.pending is None:
            return
        (step, metrics, tokens), self.pending = self.pending, None
        loss = float(metrics["loss"])  # waits for the step
        if not math.isfinite(loss):
            raise NonFiniteLoss(step, loss)
        now = time.perf_counter()
        seconds, self.since = now - self.since, now
        record = {"step": step, "loss": loss, "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
                  "tokens_per_s": tokens / seconds, "mfu": self.flops_per_token * tokens / seconds / self.peak_flops}
        if eval_loss is not None:
            record["eval_loss"] = eval_loss()
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
