"""Where a decode step's time goes: the library's step against two plain-JAX reference steps on the same weights,
and the large data-movement ops in the library step's compiled HLO.

    library    llama_jax.generation.decode_step (jitted, cache donated) on the params as the Engine holds them
               (`unstack_layers`: the layers unrolled over per-layer arrays)
    stacked    the same on the stacked params (nn.scan over the layer axis)
    scan       reference: the same math as one lax.scan over the stacked layer params, lm_head contracted against
               the embedding without a transpose, every dot with a float32 result (preferred_element_type)
    unrolled   reference: the same, with the layers unrolled over separate per-layer weight arrays (split once,
               outside jit), so no dot reads a slice of a stacked array

The three run interleaved, step by step (best and median of `rounds`); the reference's logits are checked
against the library's. The census (`decode_census`) lists the large data-movement instructions of the Engine's
compiled decode loop: bytes a step writes (and reads again) beyond reading its weights and cache once.
"""

from __future__ import annotations

import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.roofline import weight_bytes
from llama_jax.generation import GREEDY, DecodeState, decode_loop, decode_step, prefill, row_keys, sampling_rows
from llama_jax.model import init_cache, inverse_frequencies, unstack_layers

F32 = jnp.float32


def _rms(x, scale, eps, dtype):
    x32 = x.astype(F32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * scale).astype(dtype)


def _layer(x, w, k_cache, v_cache, index, cos, sin, valid, *, config, dtype):
    """One decoder layer for one new token per row. x `[batch, embed]`; caches `[batch, kv, max_len, head_dim]`."""
    c = config
    heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    batch = x.shape[0]

    def mm(a, b):
        return jnp.einsum("bi,io->bo", a, b, preferred_element_type=F32).astype(dtype)

    def rope(t):
        t1, t2 = jnp.split(t.astype(F32), 2, -1)
        return jnp.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1).astype(dtype)

    h = _rms(x, w["attn_norm"], c.rms_norm_eps, dtype)
    q = rope(mm(h, w["q"]).reshape(batch, heads, head_dim))
    k = rope(mm(h, w["k"]).reshape(batch, kv_heads, head_dim))
    v = mm(h, w["v"]).reshape(batch, kv_heads, head_dim)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[:, :, None].astype(k_cache.dtype), (0, 0, index, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v[:, :, None].astype(v_cache.dtype), (0, 0, index, 0))
    q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bkgd,bktd->bkgt", q, k_cache.astype(dtype), preferred_element_type=F32) * head_dim**-0.5
    probs = jax.nn.softmax(jnp.where(valid[:, None, None], scores, -1e30), -1).astype(dtype)
    out = jnp.einsum("bkgt,bktd->bkgd", probs, v_cache.astype(dtype), preferred_element_type=F32)
    x = x + mm(out.astype(dtype).reshape(batch, heads * head_dim), w["o"])
    h = _rms(x, w["mlp_norm"], c.rms_norm_eps, dtype)
    x = x + mm(jax.nn.silu(mm(h, w["gate"])) * mm(h, w["up"]), w["down"])
    return x, k_cache, v_cache


def _reference_step(weights, k_caches, v_caches, tokens, positions, index, *, config, dtype, unrolled):
    """A decode step: tokens `[batch]` at `positions` -> (float32 logits `[batch, vocab]`, caches)."""
    c = config
    angles = positions.astype(F32)[:, None, None] * jnp.asarray(inverse_frequencies(c))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    max_len = (k_caches[0] if unrolled else k_caches).shape[-2]
    valid = jnp.broadcast_to(jnp.arange(max_len)[None, :] <= index, (tokens.shape[0], max_len))
    layer = functools.partial(_layer, index=index, cos=cos, sin=sin, valid=valid, config=c, dtype=dtype)
    x = weights["embed"][tokens]
    if unrolled:
        k_out, v_out = [], []
        for w, kc, vc in zip(weights["layers"], k_caches, v_caches, strict=True):
            x, kc, vc = layer(x, w, kc, vc)
            k_out.append(kc)
            v_out.append(vc)
    else:
        def body(x, xs):
            w, kc, vc = xs
            x, kc, vc = layer(x, w, kc, vc)
            return x, (kc, vc)
        x, (k_out, v_out) = jax.lax.scan(body, x, (weights["layers"], k_caches, v_caches))
    h = _rms(x, weights["final_norm"], c.rms_norm_eps, dtype)
    return jnp.einsum("be,ve->bv", h, weights["head"], preferred_element_type=F32), k_out, v_out


def reference_weights(params, config, dtype, *, unrolled: bool) -> dict:
    """The params as the reference step takes them: 2-D `[in, out]` matrices, stacked or one array per layer."""
    c, p = config, params["layers"]
    embed = c.hidden_size
    layers = {"q": p["attn"]["q"].reshape(c.num_hidden_layers, embed, -1),
              "k": p["attn"]["k"].reshape(c.num_hidden_layers, embed, -1),
              "v": p["attn"]["v"].reshape(c.num_hidden_layers, embed, -1),
              "o": p["attn"]["o"].reshape(c.num_hidden_layers, -1, embed),
              "gate": p["mlp"]["gate"], "up": p["mlp"]["up"], "down": p["mlp"]["down"],
              "attn_norm": p["attn_norm"]["scale"], "mlp_norm": p["mlp_norm"]["scale"]}
    layers = {k: np.asarray(v.astype(dtype) if v.ndim == 3 else v) for k, v in layers.items()}
    if unrolled:
        layers = [{k: jnp.asarray(v[i]) for k, v in layers.items()} for i in range(c.num_hidden_layers)]
    else:
        layers = {k: jnp.asarray(v) for k, v in layers.items()}
    head = params["embed"] if c.tie_word_embeddings else params["lm_head"].T
    return {"embed": jnp.asarray(params["embed"]).astype(dtype), "layers": layers,
            "final_norm": params["final_norm"]["scale"], "head": jnp.asarray(np.asarray(head.astype(dtype)))}


class _Stepper:
    """Calls a jitted, cache-donating step again and again on the same tokens and cache slot; one call = one step."""

    def __init__(self, fn, args, cache, index):
        self.fn, self.args, self.cache, self.index = fn, args, cache, index
        self.logits, self.cache = self._step()
        self.logits.block_until_ready()

    def _step(self):
        return self.fn(*self.args, self.cache, self.index())

    def __call__(self) -> float:
        start = time.perf_counter()
        logits, self.cache = self._step()
        logits.block_until_ready()
        return time.perf_counter() - start


def profile_decode(params, config, *, dtype, batch: int = 1, max_len: int = 256, rounds: int = 15) -> dict:
    """Library vs reference decode steps at `batch` rows, cache of `max_len` slots half full. Seconds per step."""
    c = config
    index = max_len // 2
    tokens = jnp.arange(1, batch + 1, dtype=jnp.int32)
    positions = jnp.full((batch,), index, jnp.int32)

    def filled_cache():  # each stepper donates its own
        return init_cache(c, batch, max_len, dtype)._replace(segment_ids=jnp.ones((batch, max_len), jnp.int32))

    library_step = jax.jit(functools.partial(decode_step, config=c, dtype=dtype), donate_argnums=1)
    runs = {name: _Stepper(lambda p, cache, i: library_step(p, cache._replace(index=i), tokens, positions),
                           (tree,), filled_cache(), lambda: jnp.int32(index))
            for name, tree in (("library", jax.jit(unstack_layers)(params)), ("stacked", params))}
    library = runs["library"]
    shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
    for name, unrolled in (("scan", False), ("unrolled", True)):
        weights = reference_weights(params, c, dtype, unrolled=unrolled)
        step = jax.jit(functools.partial(_reference_step, config=c, dtype=dtype, unrolled=unrolled),
                       donate_argnums=(1, 2))
        if unrolled:
            kv = ([jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers)],
                  [jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers)])
        else:
            kv = (jnp.zeros((c.num_hidden_layers, *shape), dtype), jnp.zeros((c.num_hidden_layers, *shape), dtype))

        def run(w, cache, i, step=step):
            logits, k, v = step(w, cache[0], cache[1], tokens, positions, i)
            return logits, (k, v)
        runs[name] = _Stepper(run, (weights,), kv, lambda: jnp.int32(index))
    error = max(float(jnp.max(jnp.abs(runs[n].logits - library.logits))) for n in ("stacked", "scan", "unrolled"))
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run())
    return {"dtype": jnp.dtype(dtype).name, "batch": batch, "max_len": max_len, "max_abs_logit_diff": error,
            "step_s": {n: {"best": min(t), "median": float(np.median(t))} for n, t in times.items()},
            "census": decode_census(params, c, dtype=dtype, batch=batch, max_len=max_len)}


def decode_census(params, config, *, dtype, batch: int, max_len: int) -> dict:
    """The census of the Engine's decode loop program (a while over steps; the layers unrolled inside it, on
    per-layer params as the Engine holds them), in MiB written per decode step: instructions in a nested loop
    (a layer scan, were there one) count num_hidden_layers times."""
    c = config
    state = DecodeState(*(jax.ShapeDtypeStruct((batch,), t) for t in (jnp.int32, jnp.int32, jnp.bool_, jnp.int32)))
    args = (jax.eval_shape(unstack_layers, params), jax.eval_shape(lambda: init_cache(c, batch, max_len, dtype)),
            state, jax.eval_shape(lambda: row_keys(0, batch)), sampling_rows([GREEDY] * batch),
            jax.ShapeDtypeStruct((c.vocab_size,), jnp.bool_), jax.ShapeDtypeStruct((), jnp.int32))
    static = dict(config=c, dtype=dtype, attention="xla")
    decode = jax.jit(functools.partial(decode_loop, **static, width=max_len), donate_argnums=1)
    rows = hlo_census(decode.lower(*args).compile().as_text())
    per = {0: 0, 1: 1, 2: c.num_hidden_layers}
    for row in rows:
        row["mib_per_step"] = row["bytes"] * per.get(row["depth"], c.num_hidden_layers) / (1 << 20)
    return {"rows": rows, "mib_per_step": sum(r["mib_per_step"] for r in rows),
            "weights_mib": weight_bytes(c, dtype) / (1 << 20)}


def prefill_logits(params, config, *, dtype, batch: int, prompt_len: int) -> list[str]:
    """Shapes of the vocab-wide dots in the Engine's prefill program: the logits it computes."""
    c = config
    args = (jax.eval_shape(unstack_layers, params),
            jax.eval_shape(lambda: init_cache(c, batch, prompt_len + 8, dtype)),
            *(jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32) for _ in range(3)),
            jax.eval_shape(lambda: row_keys(0, batch)), sampling_rows([GREEDY] * batch),
            jax.ShapeDtypeStruct((c.vocab_size,), jnp.bool_))
    static = dict(config=c, dtype=dtype, attention="xla")
    jitted = jax.jit(functools.partial(prefill, **static), donate_argnums=1)
    text = jitted.lower(*args).compile().as_text()
    return sorted({f"{m.group(2)}[{m.group(3)}]" for m in map(_INSTRUCTION.match, text.splitlines())
                   if m and m.group(4) == "dot" and str(c.vocab_size) in m.group(3).split(",")})


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\S+?)\((.*)$")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_SKIP = ("dot", "parameter", "get-tuple-element", "tuple", "bitcast", "while", "constant", "custom-call")


def hlo_census(text: str, min_bytes: int = 1 << 20) -> list[dict]:
    """Data-movement instructions of an optimized HLO module writing >= `min_bytes` each time they run.

    Only instructions that own a buffer count (those in the entry and in while bodies, not inside fusions);
    dots are the work itself and dynamic-update-slices write their slice in place, so both are left out.
    `depth` is how many while loops enclose the instruction (0: once per call).
    """
    bodies: dict[str, list[str]] = {}
    computations: dict[str, list[tuple]] = {}
    entry, current = None, None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(2)
            computations[current] = []
            entry = current if head.group(1) else entry
            continue
        if current is None:
            continue
        loop = re.search(r" while\(.*body=%([\w.\-]+)", line)
        if loop:  # a while's output is a tuple, which _INSTRUCTION does not match
            bodies.setdefault(current, []).append(loop.group(1))
        m = _INSTRUCTION.match(line)
        if m:
            computations[current].append(m.groups())
    depth, frontier = {entry: 0}, [entry]
    while frontier:
        parent = frontier.pop()
        for body in bodies.get(parent, []):
            depth[body] = depth[parent] + 1
            frontier.append(body)
    found = []
    for computation, level in depth.items():
        for name, dtype, dims, opcode, rest in computations[computation]:
            if opcode in _SKIP or "dynamic-update-slice" in name or "dynamic_update_slice" in name:
                continue
            size = int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * _BYTES.get(dtype, 4)
            if size < min_bytes:
                continue
            what = re.search(r'op_name="([^"]+)"', rest)
            found.append({"instruction": name, "opcode": opcode, "shape": f"{dtype}[{dims}]", "bytes": size,
                          "depth": level, "op_name": "/".join(what.group(1).split("/")[-3:]) if what else ""})
    return sorted(found, key=lambda r: (-r["depth"], -r["bytes"]))
