"""The next token from the last position's logits: greedy, or sampled as transformers samples.

Sampling applies temperature, then top-k, then top-p (nucleus) to the logits, in transformers'
order and with its tie rules, and draws with ``torch.multinomial`` from torch's global generator:
``torch.manual_seed(s)`` before ``generate`` makes a run repeat exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How ``generate`` picks each token. ``do_sample=False``: the most likely one (greedy)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive count of tokens or None, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after temperature, top-k and top-p (removed tokens at -inf)."""
        scores = logits.float() / self.temperature if self.temperature != 1.0 else logits.float()
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - self.top_p)
            drop[..., -1:] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        return scores

    def next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids (B,) for logits (B, V)."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        probs = self.filtered(logits).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)
