"""Fine-tuning: the optax optimizer, the train state, and one jitted step with gradient accumulation."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.model import LlamaConfig, Remat
from llama_jax.training.lora import attach_adapters
from llama_jax.training.loss import VOCAB_CHUNK, next_token_loss

Schedule = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and a decay schedule laid out over `total_steps` optimizer steps."""

    total_steps: int
    lr: float = 2e-5
    warmup: int = 0
    schedule: Schedule = "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def learning_rate(config: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear decay to 0 at `total_steps`, or constant."""
    decay_steps = max(config.total_steps - config.warmup, 1)
    decay = {"cosine": optax.cosine_decay_schedule(config.lr, decay_steps),
             "linear": optax.linear_schedule(config.lr, 0.0, decay_steps),
             "constant": optax.constant_schedule(config.lr)}[config.schedule]
    if config.warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, config.warmup), decay], [config.warmup])


def decay_mask(params: Any) -> Any:
    """True for the weights that get weight decay: matrices, not norm scales or biases."""
    def decays(path, _):
        name = path[-1].key
        return not (name == "scale" or name.endswith("_bias"))
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.clip),
        optax.adamw(learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken


def _replicated(params: Any) -> jax.sharding.Sharding:
    """A sharding that puts a whole (small) array on every device the params live on."""
    first = jax.tree.leaves(params)[0].sharding
    return NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first


def state_shardings(params: Any, optimizer: optax.GradientTransformation) -> Any:
    """Shardings of the optimizer state: each moment laid out like its param, everything else replicated."""
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    replicated = _replicated(params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params),
                                 param_shardings, transform_non_params=lambda _: replicated)


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """Optimizer state created directly in the params' layout (Adam moments sharded like their params)."""
    params = jax.tree.map(jnp.asarray, params)
    opt_state = jax.jit(optimizer.init, out_shardings=state_shardings(params, optimizer))(params)
    return TrainState(params, opt_state, jnp.zeros((), jnp.int32))


def abstract_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """The TrainState of ShapeDtypeStructs (with shardings) for params given as such: a restore target."""
    with_sharding = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)  # noqa: E731
    opt_state = jax.tree.map(with_sharding, jax.eval_shape(optimizer.init, params),
                             state_shardings(params, optimizer))
    return TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32, sharding=_replicated(params)))


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None, *, config: LlamaConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, dtype=jnp.bfloat16,
               remat: Remat = "none", attention: str = "xla", lora_scale: float = 1.0, lora_dropout: float = 0.0,
               seed: int = 0, vocab_chunk: int = VOCAB_CHUNK) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over `accum` micro-batches: batch arrays are `[accum, micro_batch, seq]`.

    Gradients are summed over micro-batches and divided by the total target weight, so the update equals the
    one for the whole batch at once. dtype, remat, attention: as `forward`. Metrics: loss, grad_norm (before
    clipping), lr, tokens (targets counted). vocab_chunk: as `next_token_loss`.
    frozen: None (state.params are the model's params), or the frozen base params (stacked, or per layer as
    `load_params(per_layer=True)` reads them: one copy, no stacked one); then state.params are LoRA adapters
    (`init_adapters`' stacked tree) attached to it with `lora_scale`, and only they are differentiated;
    `lora_dropout` drops their inputs out with keys from (seed, step, micro-batch), so a resumed run repeats them.
    """
    def micro(carry, micro_batch):
        grad_sum, loss_sum, weight, index = carry
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step), index)
        def summed(params):
            if frozen is not None:
                params = attach_adapters(frozen, params, lora_scale, dropout=lora_dropout, key=key)
            _, aux = next_token_loss(params, micro_batch, config, dtype=dtype, remat=remat, attention=attention,
                                     vocab_chunk=vocab_chunk)
            return aux["loss_sum"], aux["weight"]
        (micro_loss, micro_weight), grads = jax.value_and_grad(summed, has_aux=True)(state.params)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, loss_sum + micro_loss, weight + micro_weight, index + 1), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, loss_sum, weight, _), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, 0), batch)
    denominator = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grad_sum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denominator, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state.step), "tokens": weight}
    return TrainState(params, opt_state, state.step + 1), metrics
