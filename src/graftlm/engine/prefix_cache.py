"""Keys and values of prompt prefixes that requests share, kept so that later prompts skip their prefill.

Requests of one task often start alike: a system prompt and an instruction, few-shot examples, a judge's
rubric, RL's k samples of one prompt. A prompt's keys and values at a position depend only on the tokens
up to it and on the adapters computing them, so a later prompt that starts with the same tokens under
the same adapters (the same versions, the same mix) can copy them instead of computing them again.

Prefixes are kept in blocks of `BLOCK` tokens, in a tree per adapter set: a node holds one block's keys
and values [layers, kv heads, BLOCK, head dim] and its children the blocks that followed it (vLLM keeps
blocks by the hash of the prefix; SGLang a radix tree of tokens; this is the tree at block granularity,
with the tokens themselves as keys, so two prefixes never share a node by a hash collision). The whole
is bounded in bytes: the least recently used block with no children goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from graftlm.engine.kv_cache import RowKVCache

BLOCK = 32  # tokens per block: small enough to share most of a prefix, large enough to copy cheaply


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]
    parent: Node | None
    k: torch.Tensor | None = None  # [layers, kv heads, BLOCK, head dim]
    v: torch.Tensor | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.roots: dict[Hashable, Node] = {}
        self.used: OrderedDict[Node, None] = OrderedDict()  # every cached block, least recently used first
        self.nbytes = 0
        # what it did (exported by /metrics)
        self.hits = self.tokens_reused = self.evictions = 0

    def _path(self, key: Hashable, prompt: Sequence[int], limit: int) -> list[Node]:
        """The cached blocks that start `prompt`, in order, covering at most `limit` tokens."""
        node, path = self.roots.get(key), []
        for start in range(0, limit - BLOCK + 1, BLOCK):
            if node is None:
                break
            node = node.children.get(tuple(prompt[start : start + BLOCK]))
            if node is None:
                break
            path.append(node)
        return path

    def restore(self, key: Hashable, prompt: Sequence[int], kv: RowKVCache, row: int) -> int:
        """Copy the longest cached prefix of `prompt` (leaving at least its last token to compute) into
        `row` of `kv`; the number of positions filled."""
        path = self._path(key, prompt, len(prompt) - 1)
        for i, node in enumerate(path):
            kv.k[:, row, :, i * BLOCK : (i + 1) * BLOCK] = node.k
            kv.v[:, row, :, i * BLOCK : (i + 1) * BLOCK] = node.v
            self.used.move_to_end(node)
        if path:
            self.hits += 1
            self.tokens_reused += len(path) * BLOCK
        return len(path) * BLOCK

    def store(self, key: Hashable, prompt: Sequence[int], kv: RowKVCache, row: int) -> None:
        """Keep the blocks of `prompt` not yet cached, from `row` of `kv` (which holds the whole prompt)."""
        node = self.roots.get(key)
        if node is None:
            node = self.roots[key] = Node((), None)
        for start in range(0, len(prompt) - BLOCK + 1, BLOCK):
            block = tuple(prompt[start : start + BLOCK])
            child = node.children.get(block)
            if child is None:
                k = kv.k[:, row, :, start : start + BLOCK].clone()
                v = kv.v[:, row, :, start : start + BLOCK].clone()
                if k.nbytes + v.nbytes > self.max_bytes:
                    return
                child = node.children[block] = Node(block, node, k, v)
                self.nbytes += k.nbytes + v.nbytes
            self.used[child] = None
            self.used.move_to_end(child)
            node = child
        self._evict(keep=node)

    def _evict(self, keep: Node) -> None:
        """Drop least recently used leaves until the cache fits its budget (never `keep`'s path)."""
        protected = set()
        n: Node | None = keep
        while n is not None:
            protected.add(n)
            n = n.parent
        while self.nbytes > self.max_bytes:
            victim = next((n for n in self.used if not n.children and n not in protected), None)
            if victim is None:
                return
            del self.used[victim]
            parent = victim.parent
            assert parent is not None and victim.k is not None and victim.v is not None
            del parent.children[victim.tokens]
            self.nbytes -= victim.k.nbytes + victim.v.nbytes
            self.evictions += 1
            if parent.parent is None and not parent.children:  # an empty root
                self.roots = {k: r for k, r in self.roots.items() if r is not parent}
