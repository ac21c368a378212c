"""A GGUF file's tokenizer metadata (byte-level BPE) as a `tokenizers` tokenizer.json, pre-tokenized as llama.cpp
does it (see `tokenizer_json_from_metadata`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from llama_jax.errors import InputError

# Meta's Llama 3 split (llama.cpp's LLAMA3 pre-tokenizer; its (?:'[sS]|...) is this (?i:...)).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how llama.cpp (llama-vocab.cpp) pre-tokenizes it:
#   "llama3":      Meta's regex, and whole words found in the vocabulary skip the merges (ignore_merges)
#   "digits+gpt2": each digit on its own, then GPT-2's regex
#   "gpt2":        GPT-2's regex; also used for a file without `pre`, as transformers does
_PRE_TOKENIZER_STYLES = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), "llama3"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits+gpt2"),
    **dict.fromkeys(("gpt2", "default"), "gpt2"),
}


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte-level spelling: entry b is the printable character standing for byte b."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    stand_ins = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(stand_ins)) for b in range(256))


def _byte_level_spelling(token: str, alphabet: frozenset[str]) -> str:
    """`token` as the BPE vocabulary spells it; llama.cpp keeps user-defined tokens as raw text."""
    if set(token) <= alphabet:
        return token
    spelling = _byte_alphabet()
    return "".join(spelling[byte] for byte in token.encode("utf-8"))


def _pre_tokenizer(style: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer for one of the `_PRE_TOKENIZER_STYLES` values."""
    if style == "llama3":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if style == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return gpt2


def _required(metadata: Mapping, key: str, source):
    """metadata[key]; `InputError` naming `source` when it is missing."""
    if key not in metadata:
        raise InputError(source, f"metadata key {key!r} is missing")
    return metadata[key]


def _post_processor(metadata: Mapping, tokens: list[str], source) -> processors.TemplateProcessing:
    """BOS / EOS insertion per tokenizer.ggml.add_bos_token / add_eos_token (default off, as transformers)."""
    edges = {}
    for edge in ("bos", "eos"):
        token_id = metadata.get(f"tokenizer.ggml.{edge}_token_id")
        if not metadata.get(f"tokenizer.ggml.add_{edge}_token", False) or token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise InputError(source, f"{edge} token id {token_id} is outside the {len(tokens)}-token vocabulary")
        edges[edge] = (tokens[token_id], token_id)
    bos, eos = edges.get("bos"), edges.get("eos")
    single = f"{f'{bos[0]}:0 ' if bos else ''}$A:0{f' {eos[0]}:0' if eos else ''}"
    pair = f"{single}{f' {bos[0]}:1' if bos else ''} $B:1{f' {eos[0]}:1' if eos else ''}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(edges.values()))


def tokenizer_json_from_metadata(metadata: Mapping, source) -> str:
    """A `tokenizers` tokenizer.json string for the byte-level BPE vocabulary in GGUF `metadata`.

    `metadata` maps GGUF keys ("tokenizer.ggml.tokens", ...) to values; `source` names the file in errors.
    Vocabulary and merges as in the file; tokens typed CONTROL become special added tokens and
    USER_DEFINED ones plain added tokens (both matched whole), as transformers does; the pre-tokenizer
    follows tokenizer.ggml.pre as llama.cpp reads it.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(source, f"tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZER_STYLES:
        raise InputError(source, f"pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZER_STYLES)}")
    style = _PRE_TOKENIZER_STYLES[pre]
    tokens, merges = (_required(metadata, f"tokenizer.ggml.{key}", source) for key in ("tokens", "merges"))
    token_types = metadata.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    alphabet = frozenset(_byte_alphabet())
    vocab = {_byte_level_spelling(token, alphabet): index for index, token in enumerate(tokens)}
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(merge.split(" ")) for merge in merges],
                         ignore_merges=style == "llama3")
    except Exception as err:  # tokenizers reports a bad vocabulary or merge list as a bare Exception
        raise InputError(source, f"tokenizer vocabulary and merges do not fit together: {err}") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(style)
    tokenizer.decoder = decoders.ByteLevel()
    # A token written outside the byte alphabet is not in the vocabulary under that spelling; transformers
    # skips those rather than grow the vocabulary, and so do we.
    whole = [(token, token_type) for token, token_type in zip(tokens, token_types) if set(token) <= alphabet]
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token, token_type in whole if token_type == gguf.TokenType.CONTROL])
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False)
                          for token, token_type in whole if token_type == gguf.TokenType.USER_DEFINED])
    tokenizer.post_processor = _post_processor(metadata, tokens, source)
    return tokenizer.to_str()
