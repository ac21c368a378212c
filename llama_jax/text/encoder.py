"""Records -> token ids with loss masks: the tokenizer, chat template and special tokens of a checkpoint.

A record is `{"text": ...}` (loss on every token) or `{"messages": [{"role", "content"}, ...]}` (rendered with the
chat template; loss only on assistant turns, their end-of-turn token included). Generation uses the same Encoder
to render chat prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jinja2
import numpy as np
from tokenizers import Tokenizer

from llama_jax.checkpoints import Checkpoint
from llama_jax.errors import InputError
from llama_jax.text.chat import chat_template_for, render_chat, takes_tools


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray        # [length] int32
    loss_mask: np.ndarray  # [length] float32: weight of each token as a prediction target


@dataclasses.dataclass(frozen=True)
class Encoder:
    """How records become examples: the tokenizer, the chat template, and the special tokens it needs."""

    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str = ""
    eos_id: int | None = None  # appended to every text record
    turn_end_ids: frozenset[int] = frozenset()  # special tokens that end a turn: nothing after them is learned

    def text(self, text: str) -> Example:
        """All tokens count; the tokenizer adds BOS if it is set up to, and EOS is appended so the model stops."""
        ids = self.tokenizer.encode(text).ids + ([self.eos_id] if self.eos_id is not None else [])
        return Example(np.asarray(ids, np.int32), np.ones(len(ids), np.float32))

    def chat(self, messages: Sequence[dict]) -> Example:
        """Only assistant turns count: each from the end of the prompt that asks for it through its end-of-turn
        token (the template's tokens after that, such as ChatML's newline, do not)."""
        if self.chat_template is None:
            raise ValueError("a messages record needs a chat template, and this checkpoint has none")
        ids = self.render(messages, False)
        mask = np.zeros(len(ids), np.float32)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = self.render(messages[:i], True), self.render(messages[:i + 1], False)
            if through[:len(before)] != before or ids[:len(through)] != through:
                raise ValueError("the chat template does not render conversations prefix by prefix")
            turn = through[len(before):]
            ends = [j for j, token in enumerate(turn) if token in self.turn_end_ids]
            mask[len(before):len(before) + (ends[-1] + 1 if ends else len(turn))] = 1
        return Example(np.asarray(ids, np.int32), mask)

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template renders tools (function specs)."""
        return self.chat_template is not None and takes_tools(self.chat_template)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool, tools: Sequence[dict] | None = None
               ) -> list[int]:
        """Token ids of `messages` (and `tools`, function specs) in the chat template, their text taken literally;
        ValueError if there is no template or it refuses the messages."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (and its tokenizer is not Llama 3's)")
        try:
            return render_chat(messages, self.tokenizer, self.chat_template, bos_token=self.bos_token,
                               add_generation_prompt=add_generation_prompt, tools=tools)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused these messages: {e}") from None

    def record(self, record: object) -> Example:
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            return self.text(record["text"])
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            messages = record["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages) or not messages:
                raise ValueError('"messages" must be a non-empty list of {"role": str, "content": str}')
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError("a messages record needs at least one assistant turn to learn from")
            return self.chat(messages)
        raise ValueError('expected {"text": str} or {"messages": [...]}')


def encoder_for(checkpoint: Checkpoint) -> Encoder:
    """The Encoder for a checkpoint: its tokenizer and chat template, EOS from its config, stop ids as turn ends."""
    if not checkpoint.tokenizer_path.exists():
        raise InputError(checkpoint.directory, "checkpoint has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path))
    try:
        template = chat_template_for(tokenizer, checkpoint.chat_template)
    except ValueError:
        template = None
    config = checkpoint.config
    bos = tokenizer.id_to_token(config.bos_token_id) if config.bos_token_id is not None else None
    specials = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    return Encoder(tokenizer, template, bos_token=bos or "",
                   eos_id=config.eos_token_id[0] if config.eos_token_id else None,
                   turn_end_ids=frozenset(specials.intersection(checkpoint.stop_ids)))
