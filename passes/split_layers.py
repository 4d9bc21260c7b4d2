"""Split a captured forward graph into prologue, one submodule per decoder layer, and epilogue.

Calibration needs to run one decoder layer at a time: GPTQ statistics are gathered layer by layer
(only that layer's weights and activations on the accelerator), and a sensitivity measurement that
prunes layer i reuses cached inputs of layer i and runs layers i..p−1 only.

Boundaries come from the graph, not from module names: the residual stream is followed from the
embedding through its chain of residual adds, two per decoder layer (after attention and after the
MLP), and a layer ends at its second add. Every node gets the partition of its latest input,
where the embedding's output and each layer-ending add open the next partition:

* partition 0 (prologue): the embedding lookup and everything that does not read the residual
  stream — positions, RoPE cos/sin, masks, shapes;
* partition k + 1: decoder layer k;
* partition p + 1 (epilogue): final norm and lm_head.

Weights (``get_attr``) stay in the top-level module and are passed to the submodule that uses
them, so a caller can keep them anywhere and move one layer's weights at a time. The split module
computes exactly what the original graph computes; it returns its outputs as a flat tuple.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module

from asaf_fx.passes.graph_utils import aten, data_users, is_op, is_row_passthrough
from asaf_fx.passes.infra import PatternError


@dataclass
class LayerSplit:
    """The split module and the top-level names of its parts, in execution order.

    ``source`` is the graph that was split: its nodes (found by pattern) name the same weight
    attributes the split module reads.
    """

    module: GraphModule
    prologue: str
    layers: list[str]
    epilogue: str
    source: GraphModule

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def residual_chain(gm: GraphModule) -> list[Node]:
    """The residual adds along the stream, from the embedding to the last layer, in order.

    Follows the embedding's output through row-preserving casts to the one ``add`` that reads it,
    then from that add to the next. Only structure is used, so this works on rotated and quantized
    graphs alike, where the linears may already be custom ops.
    """
    embeddings = [n for n in gm.graph.nodes if is_op(n, aten.embedding)]
    if len(embeddings) != 1:
        raise PatternError(f"split_layers: expected one embedding lookup, found {len(embeddings)}")
    chain, current = [], embeddings[0]
    while True:
        frontier, adds = [current], []
        while frontier:
            node = frontier.pop()
            for user in data_users(node):
                if is_op(user, aten.add):
                    adds.append(user)
                elif is_row_passthrough(user):
                    frontier.append(user)
        if not adds:
            return chain
        if len(set(adds)) > 1:
            raise PatternError("split_layers: a residual-stream value feeds more than one add", current)
        current = adds[0]
        chain.append(current)


def layer_ends(gm: GraphModule) -> list[Node]:
    """The residual adds that close each decoder layer (the second add of each attention + MLP pair)."""
    chain = residual_chain(gm)
    attentions = sum(is_op(n, aten.scaled_dot_product_attention) for n in gm.graph.nodes)
    if not chain or len(chain) != 2 * attentions:
        raise PatternError(
            f"split_layers: found {len(chain)} residual adds and {attentions} attentions; expected two adds "
            "(attention, MLP) per decoder layer"
        )
    return chain[1::2]


def layer_partitions(gm: GraphModule, ends: list[Node]) -> dict[Node, int]:
    embeddings = [n for n in gm.graph.nodes if is_op(n, aten.embedding)]
    opens_next = set(ends) | set(embeddings)
    partition: dict[Node, int] = {}
    level: dict[Node, int] = {}  # the partition a consumer of this value belongs to at least
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        partition[node] = max((level.get(a, 0) for a in inputs), default=0)
        level[node] = partition[node] + (node in opens_next)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            partition[node] = min((partition[u] for u in node.users if u in partition), default=0)
    return partition


def split_decoder_layers(gm: GraphModule) -> LayerSplit:
    """Split ``gm`` (a captured forward graph) into prologue, decoder layers and epilogue."""
    ends = layer_ends(gm)
    partition = layer_partitions(gm, ends)
    expected = set(range(len(ends) + 2))
    found = set(partition.values())
    if found != expected:
        raise PatternError(
            f"split_layers: partitions {sorted(found)} do not form prologue, {len(ends)} layers and epilogue"
        )
    root = gm  # get_attr targets resolve against the captured module itself
    split = split_module(gm, root, lambda node: partition[node], keep_original_order=True)
    split.meta.update(gm.meta)
    names = [f"submod_{k}" for k in range(len(ends) + 2)]
    missing = [name for name in names if not hasattr(split, name)]
    if missing:
        raise PatternError(f"split_layers: split_module produced no {missing}")
    return LayerSplit(split, names[0], names[1:-1], names[-1], gm)


def decoder_linears(gm: GraphModule) -> list[list[Node]]:
    """The ``aten.linear`` nodes of each decoder layer, in graph order (lm_head is not in any).

    A linear belongs to the first layer whose closing residual add comes after it in the graph.
    """
    ends = layer_ends(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    per_layer: list[list[Node]] = [[] for _ in ends]
    for node in gm.graph.nodes:
        if is_op(node, aten.linear):
            layer = next((i for i, end in enumerate(ends) if order[node] < order[end]), None)
            if layer is not None:
                per_layer[layer].append(node)
    return per_layer
