"""The training objective: masked next-token cross-entropy over the shared forward."""

from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.model import LlamaConfig, Remat, forward


def next_token_loss(params: Any, batch: dict[str, jax.Array], config: LlamaConfig, *, dtype=jnp.float32,
                    remat: Remat = "none", attention: str = "xla") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of predicting token t+1 from tokens <= t, over the weighted targets.

    batch: tokens `[batch, seq]` int; loss_mask `[batch, seq]` (weight of each token *as a target*; 0 for
    prompts, padding, and the first token); optional positions and segment_ids `[batch, seq]` for packed rows
    (a target only counts when it lies in the same segment as the token predicting it).
    Returns (loss, {"loss_sum", "weight"}) with loss = loss_sum / weight, in float32.
    """
    tokens = batch["tokens"]
    segments = batch.get("segment_ids")
    logits, _ = forward(params, tokens, config, positions=batch.get("positions"), segment_ids=segments,
                        dtype=dtype, remat=remat, attention=attention)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if segments is not None:
        weights = weights * (segments[:, 1:] == segments[:, :-1])
    loss_sum = -jnp.sum(target_log_probs * weights)
    weight = jnp.sum(weights)
    return loss_sum / jnp.maximum(weight, 1.0), {"loss_sum": loss_sum, "weight": weight}
