"""The model against the reference (transformers LlamaForCausalLM) and against itself across layouts.

Reference logits come from tests/make_fixtures.py (transformers + torch); with torch installed the same
comparison also runs live on freshly built reference models.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, load_fixture
from numerics import assert_trees_close_in_norm, float32_rtol

import llama_jax as lj
from llama_jax.checkpoints.hf_mapping import params_from_hf, params_to_hf
from llama_jax.model.sharding import named_sharding, place

FP32_TOL = 1e-4  # max abs logit difference, logits of order 1-10


def logits_of(params, tokens, config, **kwargs):
    logits, _ = jax.jit(lj.forward, static_argnames=("config", "dtype", "remat", "last_only", "attention"))(
        params, jnp.asarray(tokens), config, **kwargs)
    return np.asarray(logits)


def assert_close(actual, expected, tol):
    assert np.isfinite(actual).all(), "non-finite logits"
    err = np.abs(actual - expected).max()
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


LAYOUTS = {"stacked": lambda params: params, "unstacked": lj.unstack_layers}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_with_reference_fixtures(fixture_model, layout):
    variant, config, params, ref = fixture_model
    assert 1 < np.abs(ref["logits"]).max() < 20
    params = LAYOUTS[layout](params)
    assert ("layers" in params) == (layout == "stacked")
    assert_close(logits_of(params, ref["tokens"], config), ref["logits"], FP32_TOL)


def test_fixture_variants_cover_the_features():
    configs = {v: load_fixture(v)[0] for v in VARIANTS}
    assert configs["mha"].num_key_value_heads == configs["mha"].num_attention_heads
    assert configs["gqa"].num_groups > 1
    assert configs["tied"].tie_word_embeddings
    assert configs["bias"].attention_bias and configs["bias"].mlp_bias
    c = configs["head_dim"]
    assert c.head_dim != c.hidden_size // c.num_attention_heads
    c, ref = configs["rope_scaling"], load_fixture("rope_scaling")[2]
    assert c.rope_scaling is not None
    assert ref["tokens"].shape[1] > c.rope_scaling.original_max_position_embeddings


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_live_with_transformers(variant):
    pytest.importorskip("torch")
    from make_fixtures import build_reference

    hf_config, state_dict, ref, _ = build_reference(variant)
    config = lj.LlamaConfig.from_hf(hf_config)
    assert_close(logits_of(params_from_hf(state_dict, config), ref["tokens"], config), ref["logits"], FP32_TOL)


def test_rope_scaling_matters():
    """Guards the parity test against a no-op: without the Llama 3.1 scaling the logits move far."""
    config, params, ref = load_fixture("rope_scaling")
    unscaled = logits_of(params, ref["tokens"], config.replace(rope_scaling=None))
    assert np.abs(unscaled - ref["logits"]).max() > 100 * FP32_TOL


def test_hf_mapping_round_trip_is_bit_exact(fixture_model):
    variant, config, params, _ = fixture_model
    from safetensors.numpy import load_file

    from conftest import FIXTURES

    original = load_file(FIXTURES / variant / "model.safetensors")
    back = params_to_hf(params, config)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name


def test_mapping_rejects_a_wrong_shape():
    config, params, _ = load_fixture("gqa")
    state_dict = params_to_hf(params, config)
    state_dict["model.layers.1.self_attn.k_proj.weight"] = state_dict["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight"):
        params_from_hf(state_dict, config)


def test_bf16_forward_close_to_fp32_in_kl():
    config, params, ref = load_fixture("gqa")
    p32 = jax.nn.softmax(logits_of(params, ref["tokens"], config), axis=-1)
    bf16_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    logits16 = logits_of(bf16_params, ref["tokens"], config, dtype=jnp.bfloat16)
    assert logits16.dtype == np.float32 and np.isfinite(logits16).all()
    log_p16 = jax.nn.log_softmax(logits16, axis=-1)
    kl = np.sum(p32 * (np.log(p32) - log_p16), axis=-1)  # KL(fp32 || bf16) per position
    assert kl.max() < 2e-2 and kl.mean() < 5e-3, (kl.max(), kl.mean())
    assert kl.mean() > 0  # bf16 really ran


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_keep_logits_and_grads(remat):
    config, params, ref = load_fixture("gqa")
    tokens = jnp.asarray(ref["tokens"])

    def loss(p, remat):
        logits, _ = lj.forward(p, tokens, config, remat=remat)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # a program each, not an op at a time
    base_loss, base_grads = value_and_grad(params, "none")
    new_loss, new_grads = value_and_grad(params, remat)
    np.testing.assert_allclose(new_loss, base_loss, rtol=1e-6)
    # Recomputing the forward may fuse and order its sums differently: float32 reordering of the longest sums.
    rtol = float32_rtol(max(config.intermediate_size, config.vocab_size), depth=2 * config.num_hidden_layers)
    assert_trees_close_in_norm(new_grads, base_grads, rtol)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_equals_single_device(mesh_shape):
    assert jax.device_count() == 8
    config, params, ref = load_fixture("gqa")
    tokens = np.concatenate([ref["tokens"]] * 4)  # batch 8, divisible by every data axis
    expected = logits_of(params, tokens, config)

    spec = ",".join(f"{axis}={n}" for axis, n in zip(("data", "fsdp", "tensor"), mesh_shape))
    mesh = lj.make_mesh(spec)
    shardings = lj.param_shardings(config, mesh)
    sharded = jax.tree.map(lambda x, s: place(np.asarray(x), s), params, shardings)
    # The layout really is split: the q kernel spans all devices unless the mesh is pure data parallel.
    q = sharded["layers"]["attn"]["q"]
    shard_elems = q.addressable_shards[0].data.size
    assert shard_elems == q.size if mesh_shape[0] == 8 else shard_elems < q.size
    with jax.set_mesh(mesh):
        tokens_sharded = place(tokens, named_sharding(mesh, ("batch", "seq"), tokens.shape))
        actual = logits_of(sharded, tokens_sharded, config)
    assert_close(actual, expected, 1e-5)


def test_left_padded_batch_equals_each_row_alone():
    config, params, ref = load_fixture("gqa")
    rows = [ref["tokens"][0, :12], ref["tokens"][1, :5], ref["tokens"][0, 3:11]]
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        segments[i, width - len(row):] = 1
        positions[i, width - len(row):] = np.arange(len(row))
    batched = logits_of(params, tokens, config, positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    assert np.isfinite(batched).all()
    for i, row in enumerate(rows):
        alone = logits_of(params, row[None], config)[0]
        assert_close(batched[i, width - len(row):], alone, 1e-5)


def test_packed_segments_equal_separate_sequences():
    config, params, ref = load_fixture("gqa")
    a, b = ref["tokens"][0, :7], ref["tokens"][1, :5]
    tokens = np.concatenate([a, b])[None]
    segments = np.array([[1] * len(a) + [2] * len(b)])
    positions = np.array([list(range(len(a))) + list(range(len(b)))])
    packed = logits_of(params, tokens, config, positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    assert_close(packed[0, :len(a)], logits_of(params, a[None], config)[0], 1e-5)
    assert_close(packed[0, len(a):], logits_of(params, b[None], config)[0], 1e-5)


def test_last_only_logits_are_the_last_position():
    config, params, ref = load_fixture("tied")
    last = logits_of(params, ref["tokens"], config, last_only=True)
    assert last.shape == (2, 1, config.vocab_size)
    assert_close(last[:, 0], ref["logits"][:, -1], FP32_TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_forward_equals_full_forward(layout):
    config, params, ref = load_fixture("rope_scaling")
    params = LAYOUTS[layout](params)
    tokens = jnp.asarray(ref["tokens"][:, :40])
    cache = lj.init_cache(config, batch=2, max_len=48)
    step = jax.jit(lj.forward, static_argnames=("config", "dtype", "remat"))
    prefill, cache = step(params, tokens[:, :30], config, cache=cache)
    pieces = [prefill]
    for t in range(30, 40):
        logits, cache = step(params, tokens[:, t:t + 1], config, cache=cache)
        pieces.append(logits)
    assert int(cache.index) == 40
    assert_close(np.concatenate(pieces, axis=1), ref["logits"][:, :40], FP32_TOL)


def test_init_params_places_directly_on_mesh():
    config = lj.preset("tiny-gqa")
    mesh = lj.make_mesh("data=1,fsdp=-1,tensor=2")
    params = lj.init_params(config, jax.random.key(0), mesh=mesh)
    expected = lj.param_shardings(config, mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 params, expected)
    assert params["layers"]["mlp"]["up"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    shapes = lj.param_shapes(config)
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, shapes)


def attention_inputs(offset: int, kv_len: int):
    """Random GQA q `[2, 40, 4, 8]`, k/v `[2, 2, kv_len, 8]`, the mask (row 1 left padded by 7, `offset` cached
    slots before the queries) and which queries are real tokens."""
    from llama_jax.model.attention import attention_mask

    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, head_dim = 2, 40, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, kv_len, head_dim)), jnp.float32) for _ in range(2))
    segments = np.ones((batch, seq), np.int32)
    segments[1, :7] = 0  # left padding
    kv_segments = np.zeros((batch, kv_len), np.int32)
    kv_segments[:, :offset] = 1
    kv_segments[:, offset:offset + seq] = segments
    mask = attention_mask(jnp.asarray(segments), jnp.asarray(kv_segments), offset)
    return q, k, v, mask, segments.astype(bool)


@pytest.mark.parametrize("offset", [0, 5])
def test_blocked_attention_equals_one_block(offset):
    """Query blocks see only the slots they may (causal cut); a left-padded row and a cache offset included."""
    from llama_jax.model.attention import attend

    q, k, v, mask, real = attention_inputs(offset, kv_len=50)
    # a padding query sees nothing: its (unused) output is a mean over what it is shown
    whole = np.asarray(attend(q, k, v, mask, block=q.shape[1]))[real]
    for block in (16, 7):
        assert_close(np.asarray(attend(q, k, v, mask, block=block))[real], whole, 1e-6)


@pytest.mark.parametrize("offset, kv_len", [(0, 40), (5, 50)])
def test_fused_attention_layout_equals_attend(offset, kv_len):
    """The cuDNN path's layout, GQA head order and mask, run by jax.nn.dot_product_attention's XLA reference."""
    from llama_jax.model.attention import attend, attend_fused

    q, k, v, mask, real = attention_inputs(offset, kv_len)
    square = offset == 0 and kv_len == q.shape[1]  # no cache: the causal shortcut applies
    fused = np.asarray(attend_fused(q, k, v, mask, causal=square, implementation="xla"))
    assert_close(fused[real], np.asarray(attend(q, k, v, mask))[real], 1e-5)


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """jax.nn.dot_product_attention with implementation="cudnn" runs its XLA reference instead (no GPU here);
    yields the list of the calls' (implementation, is_causal, query seq, whether a mask was given)."""
    calls, real = [], jax.nn.dot_product_attention

    def stand_in(q, k, v, *args, implementation=None, is_causal=False, mask=None, **kwargs):
        calls.append((implementation, is_causal, q.shape[1], mask is not None))
        return real(q, k, v, *args, implementation="xla", is_causal=is_causal, mask=mask, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    return calls


@pytest.mark.slow  # bf16 attention emulated on a CPU
def test_cudnn_attention_path_matches_xla_in_bf16(cudnn_on_cpu):
    """attention="cudnn": prefill/training forwards go through the fused call (causal when there is no cache,
    with a mask only for packed or padded rows or a cache), one-token cached steps do not; logits and loss
    gradients agree with attention="xla" in bfloat16."""
    config, params, ref = load_fixture("gqa")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    tokens = jnp.asarray(ref["tokens"])
    kw = dict(dtype=jnp.bfloat16)
    assert_close(logits_of(params, tokens, config, attention="cudnn", **kw),
                 logits_of(params, tokens, config, **kw), 0.1)
    assert set(cudnn_on_cpu) == {("cudnn", True, tokens.shape[1], False)}  # (nn.scan traces its body twice)

    cudnn_on_cpu.clear()
    seq = tokens.shape[1]
    packed = dict(segment_ids=jnp.asarray([[1] * 7 + [2] * (seq - 7), [0] * 3 + [1] * (seq - 3)]),
                  positions=jnp.asarray([list(range(7)) + list(range(seq - 7)), [0] * 3 + list(range(seq - 3))]))
    assert_close(logits_of(params, tokens, config, attention="cudnn", **packed, **kw)[[0, 0, 1], [2, 9, 8]],
                 logits_of(params, tokens, config, **packed, **kw)[[0, 0, 1], [2, 9, 8]], 0.1)
    assert set(cudnn_on_cpu) == {("cudnn", True, seq, True)}

    cudnn_on_cpu.clear()
    step = jax.jit(lj.forward, static_argnames=("config", "dtype", "attention"))
    expected = []
    for attention in ("cudnn", "xla"):
        cache = lj.init_cache(config, batch=2, max_len=16, dtype=jnp.bfloat16)
        prefill, cache = step(params, tokens[:, :8], config, cache=cache, attention=attention, **kw)
        decoded, _ = step(params, tokens[:, 8:9], config, cache=cache, attention=attention, **kw)
        expected.append(np.concatenate([prefill, decoded], axis=1))
    assert_close(*expected, 0.1)
    assert set(cudnn_on_cpu) == {("cudnn", False, 8, True)}  # the prefill over the cache, not the decode step

    def loss(p, attention):
        logits, _ = lj.forward(p, tokens, config, attention=attention, **kw)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    grads = [grad(params, attention)["layers"]["attn"]["q"].astype(jnp.float32) for attention in ("cudnn", "xla")]
    assert np.isfinite(grads[0]).all() and np.abs(grads[1]).max() > 0
    np.testing.assert_allclose(*grads, atol=0.05 * np.abs(grads[1]).max())


@pytest.mark.parametrize("attention, dtype, message", [("cudnn", jnp.float32, "16-bit"), ("flash", jnp.bfloat16,
                                                                                        "must be one of")])
def test_bad_attention_choice_is_a_clear_error(attention, dtype, message):
    config, params, ref = load_fixture("gqa")
    with pytest.raises(ValueError, match=message):
        lj.forward(params, jnp.asarray(ref["tokens"]), config, attention=attention, dtype=dtype)


def test_vocab_logits_in_slices_equal_one_product_and_convert_one_slice_at_a_time(monkeypatch):
    """A single token with a bfloat16 head: the head is multiplied in slices (XLA:CPU would otherwise convert all of it
    to float32 at once); the logits are those of one product, and other shapes and dtypes are one product."""
    from llama_jax.generation.engine import CPU_NARROW_WEIGHT_OPTIONS
    from llama_jax.model import decoder

    rng = np.random.default_rng(0)
    x, head = rng.standard_normal((1, 1, 64), np.float32), rng.standard_normal((64, 1000), np.float32)
    x, head = x.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    whole = np.einsum("bse,ev->bsv", x.astype(np.float64), head.astype(np.float64))
    monkeypatch.setattr(decoder, "HEAD_SLICE_BYTES", 64 * 4 * 300)  # slices of 300, 300, 300 and 100

    def products(a, b) -> int:
        return jax.jit(lambda a, b: decoder.vocab_logits(a, b)).lower(a, b).as_text().count("dot_general")
    np.testing.assert_allclose(np.asarray(jax.jit(decoder.vocab_logits)(x, head)), whole, rtol=1e-4, atol=1e-4)
    assert products(x, head) == 4
    assert products(np.repeat(x, 2, 0), head) == products(np.repeat(x, 3, 1), head) == 1
    assert products(x.astype(np.float32), head.astype(np.float32)) == 1

    # Compiled only, as the Engine compiles on a CPU: one row against a [2048, 32768] bfloat16 head.
    row, big_head = jax.ShapeDtypeStruct((1, 1, 2048), jnp.bfloat16), jax.ShapeDtypeStruct((2048, 32768), jnp.bfloat16)
    head_f32 = 2048 * 32768 * 4
    temps = {}
    for slice_bytes in (head_f32 // 8, 1 << 40):
        monkeypatch.setattr(decoder, "HEAD_SLICE_BYTES", slice_bytes)
        compiled = jax.jit(lambda a, b: decoder.vocab_logits(a, b)).lower(row, big_head).compile(
            compiler_options=CPU_NARROW_WEIGHT_OPTIONS)
        temps[slice_bytes] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[1 << 40] >= head_f32 and temps[head_f32 // 8] < head_f32 / 4, temps
