"""Sentence embeddings of encoders (mean pooling) and how close two encoders' embeddings are."""

from __future__ import annotations

import re

import torch

from compress.calib import load_texts


def docstring_sentences(limit: int, split: str = "evaluation") -> list[str]:
    """Distinct sentences of 6 to 40 words from the first paragraphs of stdlib docstrings."""
    found: dict[str, None] = {}
    for doc in load_texts("stdlib", split):
        paragraph = " ".join(doc.split("\n\n")[0].split())
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            if 6 <= len(sentence.split()) <= 40:
                found.setdefault(sentence)
    return list(found)[:limit]


def mean_pooled(model, tokenizer, texts: list[str], max_length: int = 128) -> torch.Tensor:
    """Mean of the last hidden states over real tokens (sentence-transformers' pooling for
    all-MiniLM-L6-v2, see its 1_Pooling/config.json). Returns [N, D]."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state                       # [N, L, D]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)       # [N, L, 1]
    return (hidden * mask).sum(1) / mask.sum(1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of two [N, D] embedding matrices."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
