"""Resumable training checkpoints: an Orbax CheckpointManager of the train state plus the run's position.

Orbax commits a step by renaming a finished temporary directory, so a save interrupted by a crash or a
kill -9 is never listed (and is cleaned up): `latest_step` only ever names complete checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class RunCheckpoints:
    """RUN_DIR/checkpoints/<step>/{state, progress}: keep the newest `keep` steps."""

    def __init__(self, run_dir: str | Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, progress: dict) -> None:
        """Save the train state (sharded arrays, each process writing its own shards) and JSON progress."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        progress=ocp.args.JsonSave(progress)), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any) -> tuple[Any, dict]:
        """The newest state, restored into the shardings of `abstract_state` (a tree of ShapeDtypeStructs)."""
        step = self.latest_step()
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
        return restored["state"], restored["progress"]

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target for a state like `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
