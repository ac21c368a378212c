"""Several LoRA adapters served from one base in one batch (`attach_many`, `select_adapters`): each row equals the
forward, the engine and the server with its adapter alone; different adapters never share prefix-cache blocks; the
server lists and picks adapters by `model` and refuses unknown models and adapters that do not fit."""

import concurrent.futures
import contextlib
import functools
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_serve import start_server

from infer.__main__ import main as infer_main
from infer.serve.__main__ import main as serve_main
from llama_jax.checkpoints import load_params, open_checkpoint, read_adapter
from llama_jax.checkpoints.peft import Adapter, write_adapter
from llama_jax.generation import PagedEngine, Request
from llama_jax.model import (attach, attach_many, forward, init_adapters, param_logical_names, param_shapes,
                             select_adapters, unstack_layers)

openai = pytest.importorskip("openai")

# Two adapters of different ranks and targets (so ranks are padded and each lacks targets the other has).
ADAPTERS = {"one": dict(rank=4, alpha=8, targets=("q", "v", "down"), seed=1),
            "two": dict(rank=2, alpha=6, targets=("q", "k", "o", "gate", "up"), seed=2)}
BASE, MAX_LEN, NEW = "tiny", 32, 12
MODELS = (BASE, *ADAPTERS)  # slot 0 the base, then the adapters in order
PROMPTS = ("Hello there", "A quick fox")
CASES = [(model, PROMPTS[0]) for model in MODELS] + [("two", PROMPTS[1])]  # (model, prompt) of one batch
TOKENS = np.array([[3, 17, 42, 7, 99, 5, 1, 64], [9, 8, 7, 6, 5, 4, 3, 2], [77, 31, 13, 200, 128, 250, 64, 1]])


@pytest.fixture(scope="module")
def adapter_dirs(tiny_checkpoint, tmp_path_factory):
    """{name: PEFT adapter directory} of random, non-zero factors for the tiny checkpoint, and "misfit": one whose
    q_proj takes 64 inputs (the model's have 128)."""
    config = open_checkpoint(tiny_checkpoint).config
    root, adapters = tmp_path_factory.mktemp("adapters"), {}
    for name, spec in ADAPTERS.items():
        shapes = init_adapters(param_shapes(config), param_logical_names(config), rank=spec["rank"],
                               targets=spec["targets"], rng=jax.random.key(0))
        rng = np.random.default_rng(spec["seed"])
        weights = jax.tree.map(lambda x, rng=rng: rng.normal(0, 0.3, x.shape).astype(np.float32), shapes)
        adapters[name] = Adapter(weights, spec["rank"], float(spec["alpha"]), spec["targets"])
    q = adapters["one"].weights["layers"]["attn"]["q"]
    adapters["misfit"] = Adapter({"layers": {"attn": {"q": {"a": q["a"][:, :64], "b": q["b"]}}}}, 4, 8.0, ("q",))
    return {name: write_adapter(root / name, a, config, base=tiny_checkpoint) for name, a in adapters.items()}


def adapters_of(checkpoint, adapter_dirs, per_layer):
    """[(factors in the params' layout, scale)] of each adapter, in ADAPTERS' order."""
    read = [read_adapter(adapter_dirs[name], checkpoint.config) for name in ADAPTERS]
    return [(unstack_layers(a.weights) if per_layer else a.weights, a.scale) for a in read]


def test_each_row_equals_its_adapter_alone(tiny_checkpoint, adapter_dirs):
    """On stacked int8 params (QLoRA's layout: `nn.scan` slices the factors, scales and ids per layer); the engine
    tests below run per-layer float32 ones."""
    checkpoint = open_checkpoint(tiny_checkpoint)
    params = load_params(checkpoint, quantize="int8")
    adapters = adapters_of(checkpoint, adapter_dirs, per_layer=False)
    run = jax.jit(functools.partial(forward, config=checkpoint.config))
    base = np.asarray(run(params, TOKENS)[0])
    alone = [np.asarray(run(attach(params, factors, scale), TOKENS)[0]) for factors, scale in adapters]
    multi = attach_many(params, adapters)
    ids = jnp.array([1, 2, 0])  # row 0 adapter one, row 1 adapter two, row 2 the base
    mixed = jax.jit(lambda p, ids, t: forward(select_adapters(p, ids), t, checkpoint.config)[0])
    prefill, step = np.asarray(mixed(multi, ids, TOKENS)), np.asarray(mixed(multi, ids, TOKENS[:, :1]))
    for row, expected in enumerate([alone[0], alone[1], base]):  # a prefill gathers, a step (seq 1) masks
        np.testing.assert_allclose(prefill[row], expected[row], atol=1e-5, rtol=0)
        np.testing.assert_allclose(step[row, 0], expected[row, 0], atol=1e-5, rtol=0)
    assert np.abs(alone[0] - base).max() > 1e-2 and np.abs(alone[1] - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(run(multi, TOKENS)[0]), base, atol=1e-5, rtol=0)  # no ids: the base


@pytest.fixture(scope="module")
def alone(tiny_checkpoint, adapter_dirs):
    """{(model, prompt): `python -m infer --json` on that prompt alone, greedy}: the base and each --adapter DIR."""
    results = {}
    for model, prompt in CASES:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            adapter = [] if model == BASE else ["--adapter", str(adapter_dirs[model])]
            assert infer_main([str(tiny_checkpoint), "--prompt", prompt, "--json", "--temperature", "0",
                               "--max-new-tokens", str(NEW), *adapter]) == 0
        results[model, prompt] = json.loads(out.getvalue())
    assert len({tuple(results[model, PROMPTS[0]]["generated_token_ids"]) for model in MODELS}) == 3  # all differ
    return results


def run_all(engine, requests) -> tuple[list[list[int]], list[int]]:
    """Each request's tokens and prompt tokens taken from the prefix cache, all added at once."""
    sids = [engine.add(r) for r in requests]
    tokens, cached = {sid: [] for sid in sids}, {}
    while engine.running or engine.waiting:
        for out in engine.step():
            tokens[out.sid] += [t.id for t in out.tokens]
            cached.setdefault(out.sid, out.cached)
    return [tokens[sid] for sid in sids], [cached[sid] for sid in sids]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, adapter_dirs):
    """A PagedEngine serving the base and both adapters, as the `server` fixture's does (its programs compiled
    here, which the server then finds in the session's compilation cache)."""
    checkpoint = open_checkpoint(tiny_checkpoint)
    params = attach_many(load_params(checkpoint, per_layer=True), adapters_of(checkpoint, adapter_dirs, per_layer=True))
    engine = PagedEngine(params, checkpoint.config, slots=4, max_len=MAX_LEN, block_size=4, max_batch_tokens=MAX_LEN,
                         stop_ids=checkpoint.stop_ids, top_logprobs=5)
    engine.warm_up()
    return engine


def test_a_batch_of_adapters_equals_each_adapter_alone(engine, alone):
    requests = [Request(alone[case]["prompt_token_ids"], NEW, adapter=MODELS.index(case[0])) for case in CASES]
    tokens, _ = run_all(engine, requests)
    assert tokens == [alone[case]["generated_token_ids"] for case in CASES]
    with pytest.raises(ValueError, match="adapter 3 is not one of"):
        engine.add(Request(requests[0].prompt, NEW, adapter=3))


def test_adapters_never_share_prefix_blocks(engine):
    prompt = list(range(40, 57))  # 4 full blocks of 4, and the last token
    cached = [run_all(engine, [Request(prompt, 2, adapter=a)])[1][0] for a in (1, 2, 1, 0)]
    assert cached == [0, 0, 16, 0]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, adapter_dirs):
    yield from start_server(tiny_checkpoint, ["--name", BASE, *(f"--adapter={name}={adapter_dirs[name]}" for name in
                                                                ADAPTERS), "--slots", "4", "--max-len", str(MAX_LEN),
                                              "--block-size", "4", "--max-batch-tokens", str(MAX_LEN)])


def test_the_server_serves_each_adapter_by_model(server, alone):
    client = openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == list(MODELS)

    def complete(case):
        return client.completions.create(model=case[0], prompt=case[1], max_tokens=NEW, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:  # all at once: one batch
        answers = list(pool.map(complete, CASES))
    for case, answer in zip(CASES, answers, strict=True):
        choice = answer.choices[0]
        assert (answer.model, choice.text, choice.finish_reason) == (case[0], alone[case]["text"],
                                                                     alone[case]["finish_reason"])
    with pytest.raises(openai.NotFoundError, match="The model `three` does not exist"):
        complete(("three", PROMPTS[0]))


@pytest.mark.parametrize("name, problem", [("missing", "not a PEFT adapter"), ("misfit", "tensor .* has shape")])
def test_an_adapter_that_does_not_fit_is_one_line_at_start(tiny_checkpoint, adapter_dirs, tmp_path, capsys, name,
                                                           problem):
    directory = adapter_dirs.get(name, tmp_path / name)
    assert serve_main([str(tiny_checkpoint), "--max-len", str(MAX_LEN), "--adapter", f"{name}={directory}"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(f"error: adapter '{name}': {re.escape(str(directory))}[^\n]*: {problem}[^\n]*", err), err
