"""int8 weights and the int8 KV cache on tiny models: the math, quantized checkpoints, loading on a mesh, the CLIs."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture
from hf_dirs import make_hf_dir, read_hf_tensors

import llama_jax as lj
from convert.__main__ import main as convert_main
from infer.__main__ import main as infer_main
from llama_jax.checkpoints import load_params, open_checkpoint
from llama_jax.generation import Engine
from llama_jax.model import QuantArray, param_logical_names, quantize, quantize_tree, rows_layout
from llama_jax.model import Tiles, einsum_product, weights


def run(main, capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dequantized(params):
    """The float weights a quantized tree stands for (values * scale, in float32)."""
    return jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(x, QuantArray) else x, params,
                        is_leaf=lambda x: isinstance(x, QuantArray))


def test_quantize_is_symmetric_per_output_channel():
    """Against a numpy reference: scale = absmax over the contracted axis / 127, values = round(w / scale); an
    all-zero channel stays zero (no NaN)."""
    w = np.random.default_rng(0).normal(size=(64, 3, 8)).astype(np.float32)
    w[:, 1, 2] = 0.0
    q = quantize(jnp.asarray(w), (0,))
    scale = np.abs(w).max(axis=0, keepdims=True) / 127
    scale[scale == 0] = 1
    assert q.values.dtype == jnp.int8 and q.scale.shape == (1, 3, 8)
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.values), np.clip(np.round(w / scale), -127, 127).astype(np.int8))
    error = np.abs(np.asarray(q.dequantize(jnp.float32)) - w)
    assert np.all(error <= scale / 2 + 1e-7) and not np.any(np.isnan(error))


@pytest.mark.parametrize("variant", ["bias", "tied"])
def test_int8_forward_is_the_float_forward_of_the_dequantized_weights(tmp_path, variant):
    """The fused path (int8 converted in the dot, output channels scaled after; an int8 embedding looked up by row;
    a tied int8 head) computes exactly the model of values * scale: fp32 logits within 2e-5, stacked and per layer,
    with and without a cache."""
    config, params, _ = load_fixture(variant)
    forward = jax.jit(lj.forward, static_argnames="config")  # one program per path, not an op at a time
    tokens = jnp.array([[3, 17, 42, 7, 99, 5, 1, 64]])
    quantized = quantize_tree(params, param_logical_names(config))
    reference = forward(dequantized(quantized), tokens, config)[0]
    assert jax.tree.structure(quantized) != jax.tree.structure(params)
    for tree in (quantized, lj.unstack_layers(quantized)):
        np.testing.assert_allclose(forward(tree, tokens, config)[0], reference, atol=2e-5)
    cache = lj.init_cache(config, 1, 16)
    first, cache = forward(quantized, tokens[:, :5], config, cache=cache)
    rest, _ = forward(quantized, tokens[:, 5:], config, cache=cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), reference, atol=2e-5)
    assert float(jnp.abs(reference - forward(params, tokens, config)[0]).max()) > 1e-5  # it is quantized


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("bse,ehd->bshd", (2, 3, 64), (64, 4, 8)), ("bshd,hde->bse", (1, 1, 4, 32), (4, 32, 48)),
    ("bsi,io->bso", (16, 1, 96), (96, 64)), ("bse,ve->bsv", (1, 1, 64), (80, 64))])
def test_the_int8_kernel_is_the_einsum(spec, x_shape, w_shape):
    """The GPU's int8 product for few rows (a Pallas kernel, run here by Pallas' interpreter) against the float64
    einsum on random operands, for every spec the model projects with and 1, 6 and 16 rows (one row reduces, more
    take the padded matrix product; the contracted axis in several chunks); and its gradient in x against the
    einsum's."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.integers(-127, 128, size=w_shape), jnp.int8)
    tiles = Tiles(block_n=16, chunk=32, block_k=16)
    got = einsum_product(spec, x, w, tiles, interpret=True)
    want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(einsum_product(spec, x, w, tiles, interpret=True) * cotangent))(x)
    want_grad = jax.grad(lambda x: jnp.sum(jnp.einsum(spec, x, w.astype(x.dtype), precision="highest") * cotangent))
    np.testing.assert_allclose(grad, want_grad(x), rtol=1e-5, atol=1e-5 * float(jnp.abs(want_grad(x)).max()))
    assert einsum_product(spec, x, w, Tiles(block_n=7), interpret=True) is None  # N not a multiple: the dot's


def test_without_the_triton_backend_the_kernel_steps_aside(monkeypatch):
    """A jax without Pallas' Triton backend (deprecated from 0.11): `einsum_product` declines, and `project` keeps
    the dot, rather than failing to compile."""
    x, w = jnp.ones((1, 1, 64)), jnp.ones((64, 32), jnp.int8)
    assert einsum_product("bsi,io->bso", x, w, Tiles(16, 32, 16), interpret=True) is not None
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.endswith("pallas.triton") else find(name, *args))
    assert einsum_product("bsi,io->bso", x, w, Tiles(16, 32, 16)) is None


@pytest.mark.parametrize("variant", ["bias", "tied"])
def test_the_gpu_int8_decode_path_is_the_same_model(variant, monkeypatch):
    """What a GPU Engine runs on int8 weights: the values laid out as rows (`rows_layout`: contracted axes
    innermost, the logical shape unchanged) and products of few rows through the int8 kernel (`project` when the
    backend is a GPU; the backend is faked here and the kernel runs in Pallas' interpreter, with tiles that fit the
    tiny model). Prefill (8 rows) and then decode one token at a time give the float logits of values * scale
    within 2e-5, and every projection took the kernel; under a mesh of two devices none does."""
    config, params, _ = load_fixture(variant)
    quantized = lj.unstack_layers(quantize_tree(params, param_logical_names(config)))
    kept = rows_layout(quantized)  # not on a GPU: as they are
    assert all(a is b for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(quantized), strict=True))
    laid_out = rows_layout(quantized, platforms=("cpu",))
    up = laid_out["layer_0"]["mlp"]["up"]
    assert up.values.format.layout.major_to_minor == (1, 0)  # [embed, mlp] stored as [mlp, embed]
    again = rows_layout(laid_out, platforms=("cpu",))  # already laid out: the same arrays, no copy
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(laid_out), strict=True))
    tokens = jnp.array([[3, 17, 42, 7, 99, 5, 1, 64, 9, 12, 30]])
    reference = jax.jit(lj.forward, static_argnames="config")(dequantized(quantized), tokens, config)[0]
    calls = []

    def kernel(spec, x, values):
        out = einsum_product(spec, x, values, Tiles(block_n=16, chunk=64, block_k=16), interpret=True)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(weights, "einsum_product", kernel)
    forward = jax.jit(lj.forward, static_argnames="config")
    logits, cache = forward(laid_out, tokens[:, :8], config, cache=lj.init_cache(config, 1, 16))
    steps = [logits]
    for i in range(8, tokens.shape[1]):
        logits, cache = forward(laid_out, tokens[:, i:i + 1], config, cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), reference, atol=2e-5)
    assert calls and all(calls)  # traced twice (8 rows, then 1), each projection through the kernel
    calls.clear()
    mesh = lj.make_mesh("tensor=2", jax.devices()[:2])
    on_mesh = jax.device_put((laid_out, cache), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with jax.set_mesh(mesh):  # XLA cannot split the kernel's call: over a mesh, the dot
        logits, _ = forward(*on_mesh[:1], tokens[:, 8:9], config, cache=on_mesh[1])
    assert not calls and np.isfinite(np.asarray(logits)).all()


def test_int8_kv_cache_stores_a_scale_per_token_and_head(tmp_path):
    """The cache holds int8 keys and values and float32 scales `[..., 1]`; what attention reads back is within half
    a step of the float keys and values; logits through it stay close to a float32 cache's."""
    config, params, _ = load_fixture("gqa")
    tokens = jnp.array([[3, 17, 42, 7, 99, 5, 1, 64], [1, 2, 3, 4, 5, 6, 7, 8]])
    floats, full = lj.forward(params, tokens, config, cache=lj.init_cache(config, 2, 8))
    ints, cache = lj.forward(params, tokens, config, cache=lj.init_cache(config, 2, 8, jnp.int8))
    assert cache.k.dtype == cache.v.dtype == jnp.int8 and cache.k_scale.shape == (*cache.k.shape[:-1], 1)
    for values, scale, exact in ((cache.k, cache.k_scale, full.k), (cache.v, cache.v_scale, full.v)):
        # layer 0 (later layers' inputs already differ by what the int8 cache did to the layers before)
        restored = np.asarray(values[0], np.float32) * np.asarray(scale[0])
        assert np.all(np.abs(restored - np.asarray(exact[0])) <= np.asarray(scale[0]) / 2 + 1e-6)
    assert 0 < float(jnp.abs(ints - floats).max()) < 0.05 * float(jnp.abs(floats).max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> (float checkpoint, its `convert --quantize int8` twin), converted once per module."""
    made = {}

    def get(variant: str = "bias"):
        if variant not in made:
            root = tmp_path_factory.mktemp(variant)
            hf = make_hf_dir(root / "hf", variant)
            assert convert_main(["hf", str(hf), str(root / "float")]) == 0
            assert convert_main(["hf", str(hf), str(root / "int8"), "--quantize", "int8"]) == 0
            made[variant] = open_checkpoint(root / "float"), open_checkpoint(root / "int8")
        return made[variant]

    return get


def test_a_stored_int8_checkpoint_loads_as_quantizing_on_load_does(converted):
    """`convert --quantize int8` stores int8 values and float32 scales (metadata says so); loading it, stacked or
    per layer, gives exactly what `load_params(..., quantize="int8")` makes of the float checkpoint."""
    floats, ints = converted()
    assert ints.quantization == "int8" and floats.quantization is None
    for per_layer in (False, True):
        on_load = load_params(floats, per_layer=per_layer, quantize="int8")
        stored = load_params(ints, per_layer=per_layer)
        assert jax.tree.structure(on_load) == jax.tree.structure(stored)
        for a, b in zip(jax.tree.leaves(on_load), jax.tree.leaves(stored), strict=True):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    layer = load_params(ints, per_layer=True)["layer_0"]
    assert layer["mlp"]["up"].values.dtype == jnp.int8 and layer["mlp_norm"]["scale"].dtype == jnp.float32
    assert not isinstance(layer["attn"]["q_bias"], QuantArray)


def test_export_of_an_int8_checkpoint_is_dequantized_and_says_so(converted, tmp_path, capsys):
    _, ints = converted()
    capsys.readouterr()
    code, out, _ = run(convert_main, capsys, "export", ints.directory, tmp_path / "export")
    assert code == 0 and "holds int8 weights" in out and "dequantized" in out
    exported = read_hf_tensors(tmp_path / "export")
    original = read_hf_tensors(ints.directory.parent / "hf")
    assert exported.keys() == original.keys()
    q = load_params(ints)["layers"]["mlp"]["down"]
    np.testing.assert_allclose(exported["model.layers.1.mlp.down_proj.weight"],
                               np.asarray(q.dequantize(jnp.float32))[1].T, rtol=1e-6)
    for name, tensor in original.items():  # within half a quantization step of the original
        step = np.abs(tensor).max() / 127
        assert np.abs(exported[name] - tensor).max() <= step / 2 + 1e-6, name


@pytest.mark.parametrize("mesh_spec", ["data=2,fsdp=2,tensor=2", pytest.param("fsdp=8", marks=pytest.mark.slow)])
def test_quantize_on_load_on_a_mesh_generates_as_one_device(converted, mesh_spec):
    """Quantized while loading on a mesh (the contracted axis sharded over fsdp too): the same int8 values, laid out
    by the weights' logical names, and the Engine (int8 weights and int8 cache) emits the same greedy tokens."""
    floats, _ = converted("gqa")
    mesh = lj.make_mesh(mesh_spec)
    single = load_params(floats, per_layer=True, quantize="int8")
    sharded = load_params(floats, per_layer=True, quantize="int8", mesh=mesh)
    expected = lj.param_shardings(floats.config, mesh, unstacked=True, quantization="int8")
    for a, b, sharding in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), jax.tree.leaves(expected),
                              strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and b.sharding.is_equivalent_to(sharding, b.ndim)
    prompts = [[1, 5, 9, 33], [7, 2]]
    want = Engine(single, floats.config, max_len=32, cache_dtype=jnp.int8).generate(prompts, max_new_tokens=12)
    got = Engine(sharded, floats.config, max_len=32, cache_dtype=jnp.int8, mesh=mesh).generate(prompts,
                                                                                               max_new_tokens=12)
    assert got.completions == want.completions


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int4"], "unknown quantization 'int4': choose from int8"),
    (["--kv-cache", "int4"], "unknown --kv-cache 'int4': choose from float32, bfloat16, int8"),
])
def test_bad_quantization_flags_are_one_line(converted, capsys, args, message):
    floats, _ = converted()
    capsys.readouterr()
    code, out, err = run(infer_main, capsys, floats.directory, "--prompt", "hi", *args)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_quantizing_an_int8_checkpoint_again_is_a_noop_that_says_so(converted, capsys):
    _, ints = converted()
    capsys.readouterr()
    plain = run(infer_main, capsys, ints.directory, "--prompt", "hi", "--max-new-tokens", "4", "--json")
    again = run(infer_main, capsys, ints.directory, "--prompt", "hi", "--max-new-tokens", "4", "--json",
                "--quantize", "int8")
    assert plain[0] == again[0] == 0 and "already int8: --quantize has nothing to do" in again[2]
    assert json.loads(plain[1])["generated_token_ids"] == json.loads(again[1])["generated_token_ids"]


def test_convert_gguf_quantized_and_a_bad_quantization(tmp_path, capsys):
    """`convert gguf --quantize int8` stores what quantizing on load makes of the float conversion; an unknown
    --quantize is one line and exit 2, nothing written."""
    from gguf_files import tiny_gguf_file

    source = tiny_gguf_file(tmp_path / "tiny.gguf")
    assert convert_main(["gguf", str(source), str(tmp_path / "float")]) == 0
    assert convert_main(["gguf", str(source), str(tmp_path / "int8"), "--quantize", "int8"]) == 0
    on_load = load_params(open_checkpoint(tmp_path / "float"), quantize="int8")
    stored = load_params(open_checkpoint(tmp_path / "int8"))
    for a, b in zip(jax.tree.leaves(on_load), jax.tree.leaves(stored), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    code, out, err = run(convert_main, capsys, "gguf", source, tmp_path / "int4", "--quantize", "int4")
    assert code == 2 and out == "" and err == "error: unknown quantization 'int4': choose from int8\n"
    assert not list(tmp_path.glob("*int4*"))

