"""LoRA against Hugging Face PEFT (torch), both ways: adapters PEFT makes run here, ours load in PEFT, the merged
export equals PEFT's merge_and_unload, the adapter gradients equal PEFT's; the train CLI's LoRA runs and errors."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_dirs import make_hf_dir, read_hf_tensors
from numerics import assert_close_in_norm, float32_rtol

import llama_jax as lj
from convert.__main__ import main as convert_main
from infer.__main__ import main as infer_main
from llama_jax.checkpoints import load_params, open_checkpoint, read_adapter
from llama_jax.model import attach
from llama_jax.training import (LoraConfig, OptimizerConfig, TrainState, init_lora, make_optimizer, next_token_loss,
                                train_step)
from train.__main__ import main as train_main

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TOKENS = [[3, 17, 42, 7, 99, 5, 1, 64, 200, 13, 77, 31], [9, 8, 7, 6, 5, 4, 3, 2, 1, 250, 128, 64]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF model (the gqa fixture), its llama_jax conversion, and transformers' model of it."""
    root = tmp_path_factory.mktemp("lora")
    hf = make_hf_dir(root / "hf", "gqa")
    assert convert_main(["hf", str(hf), str(root / "ckpt")]) == 0
    return hf, root / "ckpt"


def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def peft_adapter(hf_dir, directory, *, rank=4, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj"), seed=0, **options):
    """A PEFT LoRA adapter with random, non-zero A and B, saved by PEFT; returns the PEFT model."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                             **options)
    model = peft.get_peft_model(hf_model(hf_dir), config).eval()
    model.save_pretrained(str(directory))
    return model


def our_logits(checkpoint_dir, adapter_dir, tokens, per_layer=False):
    checkpoint = open_checkpoint(checkpoint_dir)
    adapter = read_adapter(adapter_dir, checkpoint.config)
    params = load_params(checkpoint, per_layer=per_layer)
    weights = lj.unstack_layers(adapter.weights) if per_layer else adapter.weights
    return np.asarray(lj.forward(attach(params, weights, adapter.scale), jnp.array(tokens), checkpoint.config)[0])


@pytest.mark.parametrize("rslora", [False, True])
def test_an_adapter_peft_made_gives_peft_logits(base, tmp_path, rslora):
    hf, ckpt = base
    model = peft_adapter(hf, tmp_path / "adapter", use_rslora=rslora)
    with torch.no_grad():
        expected = model(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(expected - hf_model(hf)(torch.tensor(TOKENS)).logits.detach().numpy()).max() > 1e-3
    for per_layer in (False, True):
        np.testing.assert_allclose(our_logits(ckpt, tmp_path / "adapter", TOKENS, per_layer), expected, atol=1e-4)


def test_infer_with_a_peft_adapter_generates_as_peft(base, tmp_path, capsys):
    from tokenizers import Tokenizer

    hf, ckpt = base
    model = peft_adapter(hf, tmp_path / "adapter", targets=("q_proj", "v_proj"))
    prompt = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode("Hi there").ids
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
    capsys.readouterr()
    code = infer_main([str(ckpt), "--adapter", str(tmp_path / "adapter"), "--prompt", "Hi there",
                       "--max-new-tokens", "10", "--temperature", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    ours = out["generated_token_ids"]  # ends early only at the checkpoint's stop id 2, which PEFT is not told
    assert code == 0 and out["prompt_token_ids"] == prompt and ours == expected[:len(ours)]
    assert len(ours) == 10 or ours[-1] == 2


def test_merged_export_equals_merge_and_unload(base, tmp_path, capsys):
    hf, ckpt = base
    model = peft_adapter(hf, tmp_path / "adapter")
    merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    code = convert_main(["export", str(ckpt), str(tmp_path / "merged"), "--adapter", str(tmp_path / "adapter")])
    assert code == 0 and "merged" in capsys.readouterr().out
    ours = read_hf_tensors(tmp_path / "merged")
    for name, tensor in ours.items():
        np.testing.assert_allclose(tensor, merged[name], atol=1e-5, err_msg=name)


def test_adapter_gradients_equal_peft(base, tmp_path):
    """The same adapters (PEFT's random A and B, copied) and batch: our gradients of a and b equal torch's, within
    float32 rounding of reductions up to the vocabulary's length, through each layer forward and back (measured:
    1.2e-6 to 5.9e-6 of the norm; the bound is 3.0e-5)."""
    hf, ckpt = base
    model = peft_adapter(hf, tmp_path / "adapter")
    checkpoint = open_checkpoint(ckpt)
    adapter = read_adapter(tmp_path / "adapter", checkpoint.config)
    tokens = torch.tensor(TOKENS)
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    params = load_params(checkpoint)
    batch = {"tokens": jnp.array(TOKENS), "loss_mask": jnp.ones((2, 12), jnp.int32).at[:, 0].set(0)}
    grads = jax.grad(lambda ad: next_token_loss(attach(params, ad, adapter.scale), batch,
                                                   checkpoint.config)[0])(adapter.weights)
    named = dict(model.named_parameters())
    config = checkpoint.config
    rtol = float32_rtol(max(config.hidden_size, config.intermediate_size, config.vocab_size),
                        depth=2 * config.num_hidden_layers)
    for i in range(config.num_hidden_layers):
        for group, module, name in (("attn", "self_attn", "q"), ("attn", "self_attn", "o"), ("mlp", "mlp", "down")):
            prefix = f"base_model.model.model.layers.{i}.{module}.{name}_proj"
            want_a = named[f"{prefix}.lora_A.default.weight"].grad.numpy()
            want_b = named[f"{prefix}.lora_B.default.weight"].grad.numpy()
            got = grads["layers"][group][name]
            rank = adapter.rank
            assert_close_in_norm(np.asarray(got["a"][i]).reshape(-1, rank).T, want_a, rtol, f"{prefix} a")
            assert_close_in_norm(np.asarray(got["b"][i]).reshape(rank, -1).T, want_b, rtol, f"{prefix} b")


def test_train_step_updates_adapters_only(base):
    checkpoint = open_checkpoint(base[1])
    config = checkpoint.config
    mesh = lj.make_mesh("fsdp=-1")
    lora = LoraConfig(rank=4, alpha=8.0)
    with jax.set_mesh(mesh):
        frozen = load_params(checkpoint, mesh=mesh)
        before = jax.tree.map(np.asarray, frozen)
        optimizer = make_optimizer(OptimizerConfig(total_steps=3, lr=1e-2))
        adapters = init_lora(config, lora, jax.random.key(0), mesh)
        state = TrainState(adapters, optimizer.init(adapters), jnp.zeros((), jnp.int32))
        batch = {"tokens": jnp.array([TOKENS]), "loss_mask": jnp.ones((1, 2, 12), jnp.int32)}
        step = jax.jit(lambda s, b, f: train_step(s, b, f, config=config, optimizer=optimizer, schedule=lambda _: 0.0,
                                                  dtype=jnp.float32, lora_scale=lora.scale))
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch, frozen)
            losses.append(float(metrics["loss"]))
    assert losses[2] < losses[0]
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(before), strict=True):
        assert np.array_equal(np.asarray(got), want)


def write_texts(path, count=16):
    lines = [json.dumps({"text": f"The number {i} is followed by {i + 1}, and then by {i + 2}."}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def lora_run(ckpt, out: Path, *extra: str) -> list[float]:
    """`train --lora-rank 4` for 4 steps on write_texts' data (targets q, v, down, on a 2x2x2 mesh); its losses."""
    assert train_main([str(ckpt), "--data", str(write_texts(out.parent / f"{out.name}.jsonl")), "--out", str(out),
                       "--steps", "4", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--compute-dtype",
                       "float32", "--lora-rank", "4", "--lora-targets", "q,v,down", "--mesh", "fsdp=2,tensor=2,data=2",
                       *extra]) == 0
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """(run directory, losses) of one `lora_run` without dropout, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    return out, lora_run(base[1], out)


def test_an_adapter_we_train_loads_in_peft(base, trained, tmp_path, capsys):
    """`train --lora-rank 4` writes RUN/final in PEFT's format: PeftModel.from_pretrained on the HF export of the
    base gives our logits within 1e-4; `infer --adapter` and `export --adapter` take it; the loss fell."""
    hf, ckpt = base
    run, losses = trained
    final = run / "final"
    settings = json.loads((final / "adapter_config.json").read_text())
    assert settings["r"] == 4 and settings["lora_alpha"] == 8 and settings["peft_type"] == "LORA"
    assert sorted(settings["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert json.loads((final / "llama_jax_adapter.json").read_text())["base_checkpoint"] == str(ckpt.resolve())
    assert losses[-1] < losses[0]
    assert convert_main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    model = peft.PeftModel.from_pretrained(hf_model(tmp_path / "export"), str(final)).eval()
    with torch.no_grad():
        expected = model(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(expected - hf_model(hf)(torch.tensor(TOKENS)).logits.detach().numpy()).max() > 1e-3  # trained
    np.testing.assert_allclose(our_logits(ckpt, final, TOKENS), expected, atol=1e-4)
    capsys.readouterr()
    assert infer_main([str(ckpt), "--adapter", str(final), "--prompt", "The number", "--max-new-tokens", "4"]) == 0
    assert "LoRA rank 4 on q, v, down" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "0"], "--lora-rank: LoRA rank must be an integer >= 1, got 0"),
    (["--lora-rank", "4", "--lora-targets", "q,wq"], "--lora-targets: unknown LoRA target wq: choose from q, k, v"),
    (["--lora-rank", "4", "--quantize", "int4"], "--quantize: unknown quantization 'int4'"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout: LoRA dropout must be in [0, 1), got 1.0"),
])
def test_bad_lora_flags_are_one_line(base, tmp_path, capsys, args, message):
    capsys.readouterr()
    code = train_main([str(base[1]), "--data", str(write_texts(tmp_path / "d.jsonl")), "--out", str(tmp_path / "r"),
                       "--steps", "1", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_adapters_that_do_not_fit_are_one_line(base, tmp_path, capsys):
    """An adapter for another base (other shapes), and a PEFT type we do not run, each name the file."""
    hf, ckpt = base
    other = make_hf_dir(tmp_path / "other", "mha")
    peft_adapter(other, tmp_path / "wrong")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "torn" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    for adapter, message in ((tmp_path / "wrong", "adapter_model.safetensors: tensor base_model.model.model.layers."),
                             (tmp_path / "ia3", "PEFT adapter type 'IA3' is not supported (only LORA)"),
                             (tmp_path / "torn", "adapter_model.safetensors: cannot read the adapter weights"),
                             (tmp_path / "none", "not a PEFT adapter")):
        capsys.readouterr()
        code = infer_main([str(ckpt), "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "4"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and str(adapter) in err and err.count("\n") == 1, err


@pytest.mark.slow  # a training run
def test_dropout_changes_the_gradient_and_is_recorded(base, trained, tmp_path):
    """--lora-dropout: the adapters' inputs are dropped out in training (another loss from step 2 on, as B moves),
    and PEFT's lora_dropout records it; eval and inference do not drop anything. Time (~10 s): a train run with
    dropout, compiling its step, against the shared run without."""
    run, losses = trained
    dropped = lora_run(base[1], tmp_path / "dropout", "--lora-dropout", "0.5")
    for out, dropout in ((run, 0.0), (tmp_path / "dropout", 0.5)):
        assert json.loads((out / "final" / "adapter_config.json").read_text())["lora_dropout"] == dropout
    assert losses[0] == dropped[0] and losses[2] != dropped[2]
