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
                 quant: QuantConfig, plan=None, eos_token_id: int | Iterable[int] | None = None,
                 backend: str | None = "auto") -> None:
        super().__init__()
        self.forward_graph = forward_graph
        self.decode_graph = decode_graph
        self.config = config
        self.quant = quant
        self.plan = plan
        self.backend = _resolve_backend(backend, forward_graph)
        # torch.compile only traces and lowers the graphs: every weight transform already happened.
        # A tuple, so nn.Module does not register the (possibly wrapped) graphs a second time.
        self._runners = (self._compiled(forward_graph, dynamic=True),
                         None if decode_graph is None else self._compiled(decode_graph, dynamic=False))
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = [int(e) for e in eos]

    def train(self, mode: bool = True) -> CompiledModel:
        """Only records the flag: the graphs are inference-only (exported modules refuse ``train``)."""
        self.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.forward_graph.buffers()), next(self.forward_graph.parameters())).device

    def _compiled(self, gm: GraphModule, dynamic: bool):
        return gm if self.backend is None else torch.compile(gm, backend=self.backend, dynamic=dynamic)

    @property
    def max_cache_len(self) -> int | None:
        return None if self.decode_graph is None else self.decode_graph.meta["max_cache_len"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padding masks are not supported yet; pass equal-length rows without a mask")
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a 2-D LongTensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}")
        with torch.no_grad():
            out = self._runners[0](input_ids, use_cache=False)
        return CausalLMOutputWithPast(logits=out.logits)

    def decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (1, 1, vocab) for ``token`` (1, 1) at cache ``position``; writes its K/V to the cache."""
        if self.decode_graph is None:
            raise RuntimeError("this model was compiled without a decode graph (decode=False)")
        pos = torch.tensor([position], dtype=torch.long, device=token.device)
        with torch.no_grad():
            return self._runners[1](input_ids=token, cache_position=pos)

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


def _resolve_backend(backend: str | None, gm: GraphModule) -> str | None:
    """"auto": inductor when the weights live on a CUDA device, eager (None) otherwise."""
    if backend != "auto":
        return backend
    device = next((t.device for t in gm.buffers()), None) or next((t.device for t in gm.parameters()), None)
    return "inductor" if device is not None and device.type == "cuda" else None
