"""Untie input embeddings from lm_head.

Preserves: every output exactly (the embedding reads a copy of the same matrix). Needed because
norm folding and rotation change lm_head and the embedding differently; rewriting a shared matrix
twice (or once for both) is the SpinQuant tied-embedding bug.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from asaf_fx.passes.graph_utils import aten, get_tensor, is_linear, is_op, storage_key
from asaf_fx.passes.infra import PassResult, PatternError


class UntieEmbeddings:
    """Give each ``aten.embedding`` whose matrix is also a linear's weight its own copy."""

    name = "untie_embeddings"

    def __call__(self, gm: GraphModule) -> PassResult:
        embeddings = [n for n in gm.graph.nodes if is_op(n, aten.embedding)]
        if not embeddings:
            raise PatternError("untie_embeddings: the graph has no aten.embedding node; is this a language model?")
        for e in embeddings:
            if e.args[0].op != "get_attr":
                raise PatternError("untie_embeddings: embedding matrix is not a parameter", e)
        linear_weights = {storage_key(get_tensor(gm, n.args[1])) for n in gm.graph.nodes if is_linear(n)}
        modified = False
        for i, e in enumerate(embeddings):
            weight = get_tensor(gm, e.args[0])
            if storage_key(weight) not in linear_weights:
                continue
            target = f"asaf_untied_embedding_{i}"
            gm.register_parameter(target, torch.nn.Parameter(weight.detach().clone(), requires_grad=False))
            with gm.graph.inserting_before(e):
                e.replace_input_with(e.args[0], gm.graph.get_attr(target))
            modified = True
        return PassResult(gm, modified)
