"""Chat prompts and streamed text: a checkpoint's chat template rendered to token ids, and UTF-8-safe decoding.

Message contents are always encoded as plain text: a user who types "<|eot_id|>" gets the tokens of those ten
characters, never the special token, while the template's own structural tokens stay special.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# Meta's Llama 3 Instruct template (tokenizer_config.json of Meta-Llama-3-8B-Instruct): the header format.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PRIVATE_USE = range(0xF0000, 0xFFFFE)  # supplementary private use area A: stand-ins for escaped special tokens


def chat_messages(user: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after a system message when `system` is given."""
    system_turn = [] if system is None else [{"role": "system", "content": system}]
    return system_turn + [{"role": "user", "content": user}]


def chat_template_for(tokenizer: Tokenizer, checkpoint_template: str | None) -> str:
    """The Llama 3 header format for a Llama 3 tokenizer, unless the checkpoint's own template takes tools (Llama
    3.1 and later: its format for tool calls is the model's); else the checkpoint's own (HF-style jinja) template."""
    llama3 = all(tokenizer.token_to_id(t) is not None for t in LLAMA3_HEADER_TOKENS)
    if llama3 and not (checkpoint_template and takes_tools(checkpoint_template)):
        return LLAMA3_CHAT_TEMPLATE
    if checkpoint_template:
        return checkpoint_template
    raise ValueError("this checkpoint has no chat template (and its tokenizer is not Llama 3's)")


def encode_plain(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` taken literally: special-token strings in it are encoded as ordinary characters."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = previous


def _environment() -> jinja2.Environment:
    """A sandbox configured like Hugging Face's `apply_chat_template`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def takes_tools(template: str) -> bool:
    """Whether a jinja chat template reads the `tools` variable (transformers' `apply_chat_template(tools=...)`)."""
    return "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(template))


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` (JSON-like: dicts, lists, strings, numbers, None) with `change` applied to every string in it, keys
    included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, Mapping):
        return {change(k) if isinstance(k, str) else k: _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(v, change) for v in value]
    return value


def _strings(value: Any) -> Iterator[str]:
    """Every string in `value` (JSON-like), keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def render_chat(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, template: str, *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, tools: Sequence[Mapping] | None = None
                ) -> list[int]:
    """Token ids of `messages` ({"role", "content"} dicts, maybe with more JSON-like fields such as an assistant's
    "tool_calls") in the jinja chat `template`, given `tools` (function specs) as transformers gives them.

    The template's own special tokens become special ids; every string of the messages and tools is plain text.
    How: every special token string inside them is swapped for an unused private-use character before rendering
    (so template filters such as `trim` see the real text), the rendered text is split at the special token strings
    left (the template's), and each piece between them is encoded as plain text with the swaps undone.
    """
    specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special),
                      key=len, reverse=True)
    special_re = re.compile("(" + ("|".join(map(re.escape, specials)) or "(?!)") + ")")  # never empty-matches
    given = [list(messages), None if tools is None else list(tools)]
    strings = list(_strings(given))
    used = set("".join(strings) + template)
    found = sorted({s for c in strings for s in special_re.findall(c)})
    stand_in = dict(zip(found, (chr(c) for c in PRIVATE_USE if chr(c) not in used), strict=False))
    if len(stand_in) < len(found):
        raise ValueError("the messages use too many private-use characters to escape their special tokens")
    escaped, escaped_tools = _map_strings(given, lambda c: special_re.sub(lambda s: stand_in[s[0]], c))
    text = _environment().from_string(template).render(
        messages=escaped, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt,
        tools=escaped_tools)

    restore = str.maketrans({v: k for k, v in stand_in.items()})
    ids: list[int] = []
    for i, piece in enumerate(special_re.split(text)):  # plain text at even indices, template specials at odd
        if i % 2:
            ids.append(tokenizer.token_to_id(piece))
        elif piece:
            ids += encode_plain(tokenizer, piece.translate(restore))
    return ids


class StreamDecoder:
    """Turns a growing list of token ids into text increments that never end inside a UTF-8 character.

    A token can hold part of a character's bytes (emoji, CJK), which decodes to U+FFFD; trailing U+FFFDs are
    held back until the following tokens complete them. The increments concatenate to the full decode. Text is
    decoded in a window starting one push back, so decoders that drop a leading space keep it (as vLLM does).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # the window: ids[prefix:read] give context, already emitted ...
        self.read = 0  # ... and of the text of ids[read:], the first `emitted` characters are out
        self.emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _window(self) -> tuple[int, str]:
        """(length of the context text, text of the whole window)."""
        return len(self._decode(self.ids[self.prefix:self.read])), self._decode(self.ids[self.prefix:])

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; returns the new complete text ("" while a character is still incomplete)."""
        self.ids.extend(ids)
        context, text = self._window()
        ready = len(text.rstrip("\ufffd"))
        out = text[context + self.emitted:ready]
        self.emitted += len(out)
        if ready == len(text) > context:  # nothing held back: slide the window
            self.prefix, self.read, self.emitted = self.read, len(self.ids), 0
        return out

    def flush(self) -> str:
        """The text still held back, at the end of generation (truly invalid bytes come out as U+FFFD)."""
        context, text = self._window()
        out = text[context + self.emitted:]
        self.prefix, self.read, self.emitted = len(self.ids), len(self.ids), 0
        return out
