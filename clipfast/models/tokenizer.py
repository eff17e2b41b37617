"""A compact, order-preserving tokenizer for small closed-vocabulary text towers.

open_clip's BPE ids run up to 49 407, so a tiny model using them would spend most of its
parameters (and AdamW time) on a 49 408-row token embedding. CompactTokenizer keeps only the BPE
ids its words need and renumbers them by rank. Ranking preserves order, which matters: pad (0)
stays 0 and end-of-text stays the largest id, because open_clip's CLIP pools text features at the
argmax token id.
"""

from __future__ import annotations

from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

PAD_ID = 0


class CompactTokenizer:
    """Callable list[str] -> LongTensor [N, context_length] over a fixed word list."""

    def __init__(self, words: Sequence[str], context_length: int):
        if not words:
            raise ValueError("CompactTokenizer needs a non-empty word list")
        self.words = sorted(set(words))
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        bpe_ids = {PAD_ID, self._bpe.sot_token_id, self._bpe.eot_token_id}
        for word in self.words:
            bpe_ids.update(self._bpe.encode(word))
        self._compact_id = {bpe_id: rank for rank, bpe_id in enumerate(sorted(bpe_ids))}
        self.vocab_size = len(self._compact_id)
        self.sot_id = self._compact_id[self._bpe.sot_token_id]
        self.eot_id = self._compact_id[self._bpe.eot_token_id]
        self._cache: dict[str, list[int]] = {}  # captions repeat a lot in a synthetic world

    def encode(self, text: str) -> list[int]:
        """Compact ids of `text` without start/end tokens; ValueError naming unknown words."""
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        ids, unknown = [], []
        for piece in self._bpe.pat.findall(self._bpe.clean_fn(text)):
            piece_ids = self._bpe.encode(piece)
            if all(i in self._compact_id for i in piece_ids):
                ids.extend(self._compact_id[i] for i in piece_ids)
            else:
                unknown.append(piece)
        if unknown:
            raise ValueError(
                f"words not in the tokenizer vocabulary: {sorted(set(unknown))} (in {text!r}); "
                f"the vocabulary has {len(self.words)} words: {self.words}"
            )
        self._cache[text] = ids
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        tokens = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:  # truncate like open_clip: keep EOT last
                ids = ids[: self.context_length - 1] + [self.eot_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens
