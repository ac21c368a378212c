"""Training-step runs: llama_jax's jitted `train_step` and, as the peer, a torch step of the transformers model.

Both take one optimizer step (forward, backward, global-norm clip 1.0, AdamW) on the same `[batch, seq]` tokens
with every token after the first as a target. A runner compiles/warms up once; each call times one step.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import LORA_TARGETS, init_adapters, init_params, param_logical_names, unstack_layers
from llama_jax.training import (VOCAB_CHUNK, LoraConfig, OptimizerConfig, init_state, learning_rate, make_optimizer,
                                train_step)

OPTIMIZER = OptimizerConfig(total_steps=1000, lr=1e-5, warmup=0, schedule="constant")


def jitted_step(config, *, dtype, remat: str = "none", attention: str = "xla", lora: LoraConfig | None = None,
                vocab_chunk: int = VOCAB_CHUNK):
    """`train_step` with OPTIMIZER and these settings, jitted with the state donated (not yet compiled)."""
    return jax.jit(functools.partial(train_step, config=config, optimizer=make_optimizer(OPTIMIZER),
                                     schedule=learning_rate(OPTIMIZER), dtype=dtype, remat=remat, attention=attention,
                                     lora_scale=1.0 if lora is None else lora.scale, vocab_chunk=vocab_chunk),
                   donate_argnums=0)


def token_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab_size, size=(batch, seq_len)).astype(np.int32)


class OurTrainStep:
    """`train_step` jitted with the state donated; params in their own dtype (float32 here), `dtype` the compute.
    With `lora`: the params are the frozen base (cast to `dtype` and split per layer, as `train --lora-rank` keeps
    it) and the state holds fresh adapters. vocab_chunk: the loss's (see `next_token_loss`)."""

    def __init__(self, params, config, *, dtype, batch: int, seq_len: int, remat: str = "none",
                 attention: str = "xla", copy_params: bool = True, lora: LoraConfig | None = None,
                 vocab_chunk: int = VOCAB_CHUNK):
        optimizer = make_optimizer(OPTIMIZER)
        tokens = token_batch(config.vocab_size, batch, seq_len)
        mask = np.ones_like(tokens, np.float32)
        mask[:, 0] = 0
        self.batch = {"tokens": jnp.asarray(tokens)[None], "loss_mask": jnp.asarray(mask)[None]}  # accum = 1
        self.tokens = batch * seq_len
        if lora is None:  # the step donates the state: train a copy unless the caller hands the params over
            self.frozen = None
            self.state = init_state(jax.tree.map(jnp.copy, params) if copy_params else params, optimizer)
        else:
            self.frozen = unstack_layers(jax.tree.map(lambda p: p.astype(dtype), params))  # per layer, as train does
            adapters = init_adapters(params, param_logical_names(config), rank=lora.rank, targets=lora.targets,
                                     rng=jax.random.key(0))
            self.state = init_state(adapters, optimizer)
        step = jitted_step(config, dtype=dtype, remat=remat, attention=attention, lora=lora, vocab_chunk=vocab_chunk)
        start = time.perf_counter()
        self.step = step.lower(self.state, self.batch, self.frozen).compile()
        self.compile_s = time.perf_counter() - start
        start = time.perf_counter()
        self()
        self.warmup_s = time.perf_counter() - start

    @classmethod
    def fresh(cls, config, *, lora: LoraConfig | None = None, **kwargs) -> OurTrainStep:
        """A bfloat16-compute step on fresh random params that it owns: float32 (with AdamW), or for `lora` a
        bfloat16 frozen base (as `train --lora-rank` holds it); kwargs as `__init__`'s."""
        params = init_params(config, jax.random.key(1), dtype=jnp.float32 if lora is None else jnp.bfloat16)
        return cls(params, config, dtype=jnp.bfloat16, copy_params=False, lora=lora, **kwargs)

    def __call__(self) -> dict:
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch, self.frozen)
        loss = float(metrics["loss"])  # waits for the step
        seconds = time.perf_counter() - start
        assert np.isfinite(loss), loss
        return {"step_s": seconds, "tokens_per_s": self.tokens / seconds, "loss": loss}


class PeerTrainStep:
    """transformers LlamaForCausalLM: loss(labels=tokens), backward, clip_grad_norm_(1.0), torch AdamW step.

    dtype bfloat16: float32 weights and optimizer, forward/backward under torch.autocast("cpu", bfloat16), the
    counterpart of our float32 params with bfloat16 compute.
    """

    def __init__(self, model, *, dtype: str, batch: int, seq_len: int, vocab_size: int, lora_rank: int | None = None):
        import torch

        if lora_rank is not None:  # PEFT LoRA on the seven projections, alpha = 2 r, as `train --lora-rank`
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                               target_modules=[f"{t}_proj" for t in LORA_TARGETS]))
        self.torch, self.model = torch, model.train()
        self.autocast = dtype == "bfloat16"
        self.ids = torch.from_numpy(token_batch(vocab_size, batch, seq_len)).long()
        self.tokens = batch * seq_len
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.parameters = trainable
        self.optimizer = torch.optim.AdamW(trainable, lr=OPTIMIZER.lr, betas=(OPTIMIZER.b1, OPTIMIZER.b2),
                                           eps=OPTIMIZER.eps, weight_decay=OPTIMIZER.weight_decay)
        self.compile_s = 0.0
        start = time.perf_counter()
        self()
        self.warmup_s = time.perf_counter() - start

    def __call__(self) -> dict:
        torch = self.torch
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, OPTIMIZER.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        seconds = time.perf_counter() - start
        return {"step_s": seconds, "tokens_per_s": self.tokens / seconds, "loss": value}


def peer_train_runs(*, dtype: str, batch: int, seq_len: int, steps: int, threads: int, lora_rank: int | None = None
                    ) -> list[dict]:
    """`steps` timed PeerTrainStep calls (after one warm-up) in a fresh child process, on `threads` torch threads.

    A child because the two frameworks slow each other down inside one process: after a torch training step XLA's
    step ran 1.3-1.9x slower for many seconds (4.5 s -> 5.8-8.6 s, also with OMP_WAIT_POLICY=PASSIVE and after a
    3 s pause), and the torch step after ours ran 1.7x slower (5.7 s -> 9.6 s).
    """
    import json
    import subprocess
    import sys

    code = ("import json, sys, torch; from bench.cpu import peer_model; from bench.train import PeerTrainStep; "
            f"torch.set_num_threads({threads}); model = peer_model(); "
            f"step = PeerTrainStep(model, dtype={dtype!r}, batch={batch}, seq_len={seq_len}, "
            f"vocab_size=model.config.vocab_size, lora_rank={lora_rank}); "
            f"print(json.dumps([step() for _ in range({steps})]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
