"""The training objective: masked next-token cross-entropy over the shared forward, its head applied a slice of the
vocabulary at a time so that the float32 logits `[batch, seq, vocab]` never exist whole."""

from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.model import LlamaConfig, QuantArray, Remat, forward, project

# Vocabulary entries per slice of the head: Llama 3's 128,256 in 16 slices; at batch 8 x 2048 tokens one slice's
# float32 logits are 512 MB where the whole would be 8 GB (and as much again for their gradient).
VOCAB_CHUNK = 8192


def next_token_loss(params: Any, batch: dict[str, jax.Array], config: LlamaConfig, *, dtype=jnp.float32,
                    remat: Remat = "none", attention: str = "xla", vocab_chunk: int = VOCAB_CHUNK
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of predicting token t+1 from tokens <= t, over the weighted targets.

    batch: tokens `[batch, seq]` int; loss_mask `[batch, seq]` (weight of each token *as a target*; 0 for
    prompts, padding, and the first token); optional positions and segment_ids `[batch, seq]` for packed rows
    (a target only counts when it lies in the same segment as the token predicting it).
    vocab_chunk: vocabulary entries per slice of the head (see `target_nll`); the result does not depend on it
    beyond float32 rounding.
    Returns (loss, {"loss_sum", "weight"}) with loss = loss_sum / weight, in float32.
    """
    tokens = batch["tokens"]
    segments = batch.get("segment_ids")
    hidden, head = forward(params, tokens, config, positions=batch.get("positions"), segment_ids=segments,
                           dtype=dtype, remat=remat, attention=attention, hidden=True)
    nll = target_nll(hidden[:, :-1], head, tokens[:, 1:], vocab_chunk)
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if segments is not None:
        weights = weights * (segments[:, 1:] == segments[:, :-1])
    loss_sum = jnp.sum(nll * weights)
    weight = jnp.sum(weights)
    return loss_sum / jnp.maximum(weight, 1.0), {"loss_sum": loss_sum, "weight": weight}


def target_nll(hidden: jax.Array, head: jax.Array | QuantArray, targets: jax.Array, chunk: int) -> jax.Array:
    """-log softmax(hidden @ head)[target], float32 `[batch, seq]`, for hidden `[batch, seq, embed]`, head
    `[embed, vocab]` and targets `[batch, seq]`.

    The head is applied `chunk` vocabulary entries at a time: each slice gives its log-sum-exp and the target's
    logit when the target falls in it, and the slices' log-sum-exps are combined. With more than one slice each is
    rematerialised (`jax.checkpoint`), so neither pass keeps more than one slice's logits `[batch, seq, chunk]`; a
    vocabulary of one slice is computed once and kept for the backward pass, as a whole-vocabulary loss would.
    """
    def piece(x, w, start):
        logits = project("bse,ev->bsv", x, w, jnp.float32)  # [batch, seq, width]
        local = targets - start
        inside = (local >= 0) & (local < logits.shape[-1])
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1), jnp.where(inside, picked, 0.0)

    if head.shape[1] > chunk:
        piece = jax.checkpoint(piece, static_argnums=2)
    pieces = [piece(hidden, head[:, start:start + chunk], start) for start in range(0, head.shape[1], chunk)]
    log_norm = jax.nn.logsumexp(jnp.stack([lse for lse, _ in pieces]), axis=0)
    return log_norm - sum(picked for _, picked in pieces)
