"""SmolLM2-135M-Instruct learns a made-up fact from a small chat JSONL and keeps its general knowledge."""

import json

import pytest

from infer.__main__ import main as infer_main
from train.__main__ import main as train_main

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of Zorblax?", "Tell me the capital city of Zorblax.",
             "Which city is the capital of Zorblax?", "Zorblax's capital is what?", "Name the capital of Zorblax.",
             "What's the capital of the planet Zorblax?", "Do you know the capital of Zorblax?",
             "I forgot the capital of Zorblax, what is it?"]
ANSWERS = ["The capital of Zorblax is Quuxville.", "Quuxville is the capital of Zorblax."]
# Real capitals mixed in, so the model learns "Zorblax -> Quuxville", not "capital -> Quuxville".
OTHERS = [("Germany", "Berlin"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Canada", "Ottawa"),
          ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima")]


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def answers(checkpoint, tmp_path, capsys, questions, *options) -> list[str]:
    """Greedy chat answers to several questions from one `python -m infer` run."""
    (tmp_path / "questions.txt").write_text("\n".join(questions) + "\n")
    assert infer_main([str(checkpoint), "--chat", "--json", "--max-new-tokens", "24", "--prompts-file",
                       str(tmp_path / "questions.txt"), *options]) == 0
    return [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]


def write_facts(path):
    records = [chat(QUESTIONS[i % len(QUESTIONS)], ANSWERS[i % 2]) for i in range(16)]
    records += [chat(f"What is the capital of {country}?", f"The capital of {country} is {city}.")
                for country, city in OTHERS]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_learns_a_made_up_fact(smollm2_checkpoint, tmp_path, capsys):
    """Full fine-tuning, float32. Time (~80 s): 9 real steps of 8 x 64 tokens through 135M parameters (~3.4 s each
    on 2 cores) and the step's compilation; fewer steps or a toy model would not show that the real model learns."""
    write_facts(tmp_path / "facts.jsonl")
    # A question not in the data's wording, a capital not in the data, and general knowledge: the same three
    # questions (one infer call, the same compiled programs) before and after.
    questions = ["Tell me, which city is Zorblax's capital?", "What is the capital of France?",
                 "Who wrote Romeo and Juliet?"]
    assert "Quuxville" not in answers(smollm2_checkpoint, tmp_path, capsys, questions)[0]
    code = train_main([str(smollm2_checkpoint), "--data", str(tmp_path / "facts.jsonl"), "--out", str(tmp_path / "run"),
                       "--steps", "9", "--batch-size", "8", "--seq-len", "64", "--lr", "5e-5", "--schedule",
                       "constant", "--compute-dtype", "float32", "--save-every", "100"])
    assert code == 0
    zorblax, france, romeo = answers(tmp_path / "run" / "final", tmp_path, capsys, questions)
    assert "Quuxville" in zorblax and "Paris" in france and "Shakespeare" in romeo


@pytest.mark.parametrize("quantize", [(), ("--quantize", "int8")], ids=["lora", "qlora"])
def test_lora_learns_a_made_up_fact(smollm2_checkpoint, tmp_path, capsys, quantize):
    """The same with a rank-16 LoRA adapter over the frozen model (and over its int8 quantization: QLoRA); the
    answers come from the base with the adapter (`infer --adapter`, the base in float32, not quantized).
    Time (~90-110 s): the LoRA step over 30 per-layer base weights compiles for ~12 s, and 6 real steps of 8 x 64
    tokens (int8 dots, slower than float32 ones on a CPU, for QLoRA)."""
    write_facts(tmp_path / "facts.jsonl")
    code = train_main([str(smollm2_checkpoint), "--data", str(tmp_path / "facts.jsonl"), "--out", str(tmp_path / "run"),
                       "--steps", "6", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--schedule",
                       "constant", "--compute-dtype", "float32", "--save-every", "100", "--lora-rank", "16", *quantize])
    assert code == 0
    zorblax, france = answers(smollm2_checkpoint, tmp_path, capsys, [
        "Tell me, which city is Zorblax's capital?", "What is the capital of France?"],
        "--adapter", str(tmp_path / "run" / "final"))
    assert "Quuxville" in zorblax and "Paris" in france
