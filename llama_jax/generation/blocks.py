"""The host's bookkeeping of a paged KV pool: which blocks are free, which are held (and by how many requests),
and which hold a known run of tokens (the prefix cache).

Every full block that a request has computed is keyed by a digest of its tokens and of its parent block's key, so
a key names the whole prefix up to the end of that block, and the adapter it was computed with (`root_key`). A new
request takes the longest run of cached blocks that its prompt begins with and computes only the rest. Blocks whose
requests have finished stay cached while free, and are handed out again least recently used first (their key
forgotten then). A cached block is never written again: only full blocks are shared, and a request writes only
after its last full cached block.

What every block holds is noted too, full or not (its parent's key and its tokens), so a request whose prompt goes
on past its shared full blocks with some of a cached block's tokens (a conversation sent again with the reply and a
new turn, a prompt sent twice) takes those too: `extend` finds the block, and the engine copies it into a block of
the request's own before the request writes there (copy on write).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from llama_jax.model import NULL_BLOCK

ROOT = b"llama_jax"


def root_key(adapter: int) -> bytes:
    """The parent key of a request's first block: ROOT for the base, one of its own for each LoRA adapter, so that
    blocks computed under one adapter are never reused under another (their keys and values differ)."""
    if adapter == 0:
        return ROOT
    return hashlib.blake2b(ROOT + b"/adapter" + str(adapter).encode(), digest_size=16).digest()


def block_keys(tokens: Sequence[int], block_size: int, parent: bytes = ROOT) -> list[bytes]:
    """The key of each full block of `tokens`: a digest of the block's tokens and its parent's key (`parent`: the
    key of the block before `tokens`, to extend a request's keys)."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        data = np.asarray(tokens[start:start + block_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + data, digest_size=16).digest()
        keys.append(parent)
    return keys


class BlockPool:
    """`blocks` blocks of `block_size` tokens; block NULL_BLOCK is never handed out.

    prefix_cache: keep full blocks' keys so later requests can share them (False: blocks are plain memory).
    """

    def __init__(self, blocks: int, block_size: int, *, prefix_cache: bool = True):
        if blocks < 2:
            raise ValueError(f"a pool needs at least 2 blocks (one is the null block), got {blocks}")
        self.block_size, self.prefix_cache = block_size, prefix_cache
        self.refs = np.zeros(blocks, np.int64)
        # Free blocks, least recently used first; a free block may still hold a cached run of tokens.
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict(
            (b, None) for b in range(blocks) if b != NULL_BLOCK)
        self.key_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.content: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # block -> (its parent's key, its tokens)
        self.children: dict[bytes, set[int]] = collections.defaultdict(set)  # parent's key -> blocks noted after it

    @property
    def usable(self) -> int:
        """Blocks that requests can hold (all but the null block)."""
        return len(self.refs) - 1

    def available(self) -> int:
        """Blocks that `allocate` can hand out now (free ones, cached or not)."""
        return len(self.free)

    def cached(self) -> int:
        """Blocks that hold a cached run of tokens (held or free)."""
        return len(self.block_of)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys` (block_keys of a prompt); not taken yet."""
        found = []
        if self.prefix_cache:
            for key in keys:
                block = self.block_of.get(key)
                if block is None:
                    break
                found.append(block)
        return found

    def extend(self, parent: bytes, tokens: Sequence[int]) -> tuple[int | None, int]:
        """The noted block after the prefix `parent` whose tokens begin as `tokens` do for longest, and for how many
        tokens (at least one; (None, 0) if none does). Not taken: copy it before a step can allocate it again."""
        best, count = None, 0
        for block in self.children.get(parent, ()):
            held = self.content[block][1]
            n = next((i for i, (a, b) in enumerate(zip(held, tokens)) if a != b), min(len(held), len(tokens)))
            if n > count:
                best, count = block, n
        return best, count

    def take(self, blocks: Sequence[int]) -> None:
        """Hold cached blocks (from `match`) for one more request."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks for one request (least recently used free ones, their cached keys forgotten), or None
        when fewer are free."""
        if count > len(self.free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            key = self.key_of.pop(block, None)
            if key is not None:
                del self.block_of[key]
            self._forget(block)
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """A request lets go of its blocks `[first .. last]`; those no one holds become free. Uncached ones are
        handed out first; cached (or noted) ones last, a prefix's first block after its later ones (a block is of use
        only with its parents). A block keeps its key and note until it is allocated again."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=block in self.content)

    def register(self, block: int, key: bytes, parent: bytes, tokens: Sequence[int]) -> None:
        """Record that `block` (held, full, computed) holds the prefix `key`, its `tokens` after the prefix `parent`;
        the first block for a key keeps it."""
        if self.prefix_cache and key not in self.block_of and block not in self.key_of:
            self.block_of[key], self.key_of[block] = block, key
        self.note(block, parent, tokens)

    def note(self, block: int, parent: bytes, tokens: Sequence[int]) -> None:
        """Record that the held `block` holds the keys and values of `tokens` (a block's worth or fewer: a request
        writes only after those) after the prefix `parent`, for `extend`."""
        if self.prefix_cache:
            self._forget(block)
            self.content[block] = (parent, tuple(tokens))
            self.children[parent].add(block)

    def _forget(self, block: int) -> None:
        if block in self.content:
            parent = self.content.pop(block)[0]
            self.children[parent].discard(block)
            if not self.children[parent]:
                del self.children[parent]
