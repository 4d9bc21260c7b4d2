"""``CompiledModel``: the module ``asaf_fx.compile`` returns — a forward graph and a decode graph."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import GraphModule
from transformers.modeling_outputs import CausalLMOutputWithPast

from asaf_fx.config import QuantConfig


class CompiledModel(torch.nn.Module):
    """Rewritten graphs of one causal LM.

    ``forward(input_ids)`` runs the full-sequence graph (any batch and length) and returns an
    output with ``.logits``; ``generate(input_ids, max_new_tokens)`` decodes greedily, one token
    per step, through the static-KV-cache graph (batch 1, prompt + new tokens ≤ ``max_cache_len``).
    """

    def __init__(self, forward_graph: GraphModule, decode_graph: GraphModule | None, config,
                 quant: QuantConfig, eos_token_id: int | Iterable[int] | None = None) -> None:
        super().__init__()
        self.forward_graph = forward_graph
        self.decode_graph = decode_graph
        self.config = config
        self.quant = quant
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = [int(e) for e in eos]

    @property
    def max_cache_len(self) -> int | None:
        return None if self.decode_graph is None else self.decode_graph.meta["max_cache_len"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padding masks are not supported yet; pass equal-length rows without a mask")
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a 2-D LongTensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}")
        with torch.no_grad():
            out = self.forward_graph(input_ids, use_cache=False)
        return CausalLMOutputWithPast(logits=out.logits)

    def decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (1, 1, vocab) for ``token`` (1, 1) at cache ``position``; writes its K/V to the cache."""
        if self.decode_graph is None:
            raise RuntimeError("this model was compiled without a decode graph (decode=False)")
        pos = torch.tensor([position], dtype=torch.long, device=token.device)
        with torch.no_grad():
            return self.decode_graph(input_ids=token, cache_position=pos)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 eos_token_id: int | Iterable[int] | None = None) -> torch.Tensor:
        """Greedy decoding; returns prompt + new tokens, stopping after an EOS token.

        ``eos_token_id`` defaults to the model's generation config (as transformers does).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"generate decodes one sequence at a time; got input_ids of shape {tuple(input_ids.shape)}")
        total = input_ids.shape[1] + max_new_tokens
        if self.max_cache_len is not None and total > self.max_cache_len:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the static "
                             f"cache of {self.max_cache_len} positions; compile with a larger max_cache_len")
        eos = self.eos_token_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        tokens = input_ids.clone()
        logits = None
        for i in range(input_ids.shape[1]):  # prefill one token at a time (the graph has seq length 1)
            logits = self.decode_step(tokens[:, i:i + 1], i)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            if int(nxt) in eos:
                break
            logits = self.decode_step(nxt, tokens.shape[1] - 1)
        return tokens
