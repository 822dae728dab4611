"""Perplexity, and KL divergence / top-1 agreement of next-token distributions vs a baseline."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from compress.progress import bar


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(ids.to(device), use_cache=False).logits.float().cpu()


@dataclass
class Accuracy:
    tokens: int
    perplexity: float
    baseline_perplexity: float | None = None
    kl_divergence: float | None = None     # mean KL(baseline || model) per token, nats
    top1_agreement: float | None = None    # fraction of tokens with the same argmax

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood. logits: [B, L, V], ids: [B, L]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           ids[:, 1:].reshape(-1), reduction="sum").item()


def evaluate_accuracy(model, windows: torch.Tensor, baseline=None, batch_size: int = 4) -> Accuracy:
    """Perplexity of `model` on `windows` [N, L]; with a baseline, also KL and top-1 agreement."""
    nll = base_nll = kl = agree = 0.0
    tokens = 0
    with bar("evaluating", len(windows)) as advance:
        for ids in windows.split(batch_size):
            logits = _logits(model, ids)
            nll += nll_sum(logits, ids)
            tokens += ids[:, 1:].numel()
            if baseline is not None:
                base = _logits(baseline, ids)
                base_nll += nll_sum(base, ids)
                logp, base_logp = logits.log_softmax(-1), base.log_softmax(-1)
                kl += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
                agree += (logits.argmax(-1) == base.argmax(-1)).sum().item()
            advance(len(ids))
    result = Accuracy(tokens=tokens, perplexity=math.exp(nll / tokens))
    if baseline is not None:
        positions = windows.numel()
        result.baseline_perplexity = math.exp(base_nll / tokens)
        result.kl_divergence = kl / positions
        result.top1_agreement = agree / positions
    return result


def rolling_nll(model, ids: torch.Tensor, prefix: int, max_length: int) -> tuple[float, int]:
    """Summed NLL of every token of one document and the token count, as lm-eval's
    loglikelihood_rolling: the document preceded by `prefix` (BOS, else EOS); tokens are predicted
    in consecutive blocks of `max_length`, each block read by a window of `max_length` inputs
    ending just before its last token (so the final, shorter block gets extra context).
    ids: [T] int64."""
    stream = torch.cat([torch.tensor([prefix]), ids])  # stream[j] precedes ids[j]
    nll = 0.0
    for start in range(0, ids.numel(), max_length):
        end = min(start + max_length, ids.numel())        # predict ids[start:end]
        inputs = stream[max(0, end - max_length):end][None]
        logits = _logits(model, inputs)[0, -(end - start):]
        nll += F.cross_entropy(logits, ids[start:end], reduction="sum").item()
    return nll, ids.numel()
