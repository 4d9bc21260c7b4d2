"""Find the residual stream: the embedding output and every value derived from it by residual adds.

Walks the graph in topological order and classifies each node that reads a stream value:
casts and batch/sequence slices stay in the stream, an RMSNorm (without scale) maps it to a
normalised stream value, a residual add joins the output of a *writer* linear, and a linear that
reads it is a *reader*. A norm scale stays only where a tied lm_head reads it (``head_scales``).
Anything else (another unfolded norm scale, a non-linear reader, the stream reaching the graph
output) is a ``PatternError`` naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from asaf_fx.passes.graph_utils import (
    aten,
    data_users,
    embedding_storages,
    is_linear,
    is_op,
    is_row_passthrough,
    source_through,
)
from asaf_fx.passes.infra import PatternError
from asaf_fx.passes.patterns import RMSNorm, find_rmsnorms
from asaf_fx.passes.rotate.fold_norms import tied_head_scale


@dataclass
class ResidualStream:
    embeddings: list[Node] = field(default_factory=list)
    readers: list[Node] = field(default_factory=list)  # linears reading a (normalised) stream value
    writers: list[Node] = field(default_factory=list)  # linears whose output is added to the stream
    norms: list[RMSNorm] = field(default_factory=list)
    head_scales: list[RMSNorm] = field(default_factory=list)  # norms whose scale a tied lm_head reads
    values: set[Node] = field(default_factory=set)


def _is_scalar_mul(node: Node, x: Node) -> bool:
    return is_op(node, aten.mul) and any(isinstance(a, (int, float)) for a in node.args[:2]) and x in node.args


def find_residual_stream(gm: GraphModule) -> ResidualStream:
    rs = ResidualStream(embeddings=[n for n in gm.graph.nodes if is_op(n, aten.embedding)])
    if not rs.embeddings:
        raise PatternError("residual stream: the graph has no aten.embedding node")
    norms = find_rmsnorms(gm)
    by_input = {m.input: m for m in norms}
    pow_nodes = {u for m in norms for u in data_users(m.input) if is_op(u, aten.pow)}
    normalized = {m.normalized: m for m in norms}
    weight_muls = {m.weight_mul: m for m in norms if m.weight_mul is not None}
    tied = embedding_storages(gm)
    stream = rs.values
    stream.update(rs.embeddings)
    for n in gm.graph.nodes:
        inputs = [a for a in n.all_input_nodes if a in stream]
        if not inputs or n in stream or is_op(n, aten._assert_tensor_metadata):
            continue
        if (is_row_passthrough(n) and n.args[0] in stream) or _is_scalar_mul(n, inputs[0]):
            stream.add(n)
        elif n in pow_nodes and n.args[0] in by_input:
            continue  # pow -> mean -> rsqrt: a per-row scalar, unchanged by rotation
        elif n in normalized and normalized[n].input in stream:
            stream.add(n)
            rs.norms.append(normalized[n])
        elif n in weight_muls and tied_head_scale(gm, weight_muls[n], tied):
            stream.add(n)
            rs.head_scales.append(weight_muls[n])
        elif n in weight_muls:
            raise PatternError("residual stream: an RMSNorm scale is still in the graph; run FoldNorms first", n)
        elif is_op(n, aten.add) and len(inputs) == 1:
            other = n.args[1] if n.args[0] is inputs[0] else n.args[0]
            writer = source_through(other, is_row_passthrough) if isinstance(other, Node) else other
            if not is_linear(writer):
                raise PatternError("residual stream: a residual add whose other operand is not a linear", n)
            rs.writers.append(writer)
            stream.add(n)
        elif is_op(n, aten.add) and len(inputs) == 2:
            stream.add(n)
        elif is_linear(n) and n.args[0] in stream and n.args[1] not in stream:
            rs.readers.append(n)
        elif n.op == "output":
            raise PatternError("residual stream: a residual-stream value is a graph output "
                               "(hidden states cannot be returned from a rotated graph)", n)
        else:
            raise PatternError(f"residual stream: unsupported consumer {n.target} of a residual-stream value", n)
    if not rs.writers or not rs.readers:
        raise PatternError(f"residual stream: found {len(rs.readers)} readers and {len(rs.writers)} writers; "
                           "expected transformer blocks with residual adds")
    return rs
