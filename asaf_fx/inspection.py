"""``asaf_fx.inspect``: a per-layer view of a captured or compiled model's graph.

Layers are found by pattern, like the passes: the graph is cut at each RMSNorm, and a pre-norm
transformer layer is two consecutive segments (attention, MLP). Whatever precedes the first norm is
"embed"; the segment of the final norm is "head". (Named ``inspection`` because a module called
``inspect`` shadows the standard library in some tools.)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch.fx import GraphModule, Node

import asaf_fx.ops  # noqa: F401  registers torch.ops.asaf_fx (the INT4 linears inspected)
from asaf_fx.passes.graph_utils import aten, get_tensor, is_linear, is_op
from asaf_fx.passes.infra import META_KEY
from asaf_fx.passes.patterns import find_rmsnorms

HADAMARD = "asaf_fx.hadamard_rotate"
INT4_LINEARS = (torch.ops.asaf_fx.w4a16_linear, torch.ops.asaf_fx.w4a_int_linear)


@dataclass(frozen=True)
class LinearInfo:
    """One linear as the graph runs it, measured from the tensors it reads."""

    weight: str  # the weight's name as captured ("model.layers.0.mlp.down_proj.weight")
    out_features: int
    in_features: int
    w_bits: int | None  # 4 for packed INT4; None for a float weight (8-bit weights are stored dequantized)
    a_bits: int  # bits of its input (16 = not quantized)
    weight_bytes: int  # bytes of the tensors the linear reads: weight (+ scales, bias)

    @property
    def flops(self) -> int:
        """FLOPs per token: 2 per multiply-add."""
        return 2 * self.out_features * self.in_features


@dataclass
class LayerInfo:
    name: str  # "embed", "0", "1", ..., "head"
    nodes: list[Node] = field(default_factory=list)
    linears: list[LinearInfo] = field(default_factory=list)
    online_rotations: list[int] = field(default_factory=list)  # widths of hadamard_rotate nodes
    norm_scales: int = 0  # RMSNorm scale multiplies still in the graph (0 once folded)
    ops: Counter = field(default_factory=Counter)
    removed_flops: int = 0  # FLOPs per token of the MLP channels pruned away

    @property
    def flops(self) -> int:
        return sum(lin.flops for lin in self.linears)

    @property
    def weight_bytes(self) -> int:
        return sum(lin.weight_bytes for lin in self.linears)

    @property
    def sparsity(self) -> float:
        """Fraction of this layer's dense linear FLOPs removed by pruning."""
        dense = self.flops + self.removed_flops
        return self.removed_flops / dense if dense else 0.0


def _bytes(gm: GraphModule, node: object) -> int:
    if not isinstance(node, Node) or node.op != "get_attr":
        return 0
    t = get_tensor(gm, node)
    return t.numel() * t.element_size()


def _input_bits(x: Node) -> int:
    return int(x.meta.get("asaf_fx", {}).get("activation_bits", 16)) if isinstance(x, Node) else 16


def linear_info(gm: GraphModule, node: Node) -> LinearInfo | None:
    """What a linear node (float ``aten.linear`` or an INT4 kernel op) computes and reads, else None."""
    if is_linear(node):
        out, inp = get_tensor(gm, node.args[1]).shape
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return LinearInfo(node.args[1].target, int(out), int(inp), None, _input_bits(node.args[0]),
                          _bytes(gm, node.args[1]) + _bytes(gm, bias))
    if is_op(node, *INT4_LINEARS):
        int_input = is_op(node, torch.ops.asaf_fx.w4a_int_linear)
        packed, scales, bias = node.args[2:5] if int_input else node.args[1:4]
        return LinearInfo(node.meta.get("asaf_fx", {}).get("weight", packed.target), int(get_tensor(gm, packed).shape[0]),
                          int(node.args[0].meta["val"].shape[-1]), 4, _input_bits(node.args[0]) if int_input else 16,
                          _bytes(gm, packed) + _bytes(gm, scales) + _bytes(gm, bias))
    return None


def _graph_of(obj) -> GraphModule:
    from asaf_fx.compiled import CompiledModel

    if isinstance(obj, CompiledModel):
        return obj.forward_graph
    if isinstance(obj, GraphModule):
        return obj
    if isinstance(obj, torch.nn.Module) and hasattr(obj, "config"):
        from asaf_fx.passes.capture import capture_forward

        return capture_forward(obj)
    raise TypeError(f"inspect expects a CompiledModel, a captured GraphModule or a transformers model, "
                    f"got {type(obj).__name__}")


def layers(gm: GraphModule) -> list[LayerInfo]:
    """Per-layer summary of ``gm`` (see the module docstring for how layers are found)."""
    norms = find_rmsnorms(gm)
    starts = {n: i for i, m in enumerate(norms) for n in m.input.users if is_op(n, aten.pow)}
    scale_muls = {m.weight_mul for m in norms if m.weight_mul is not None}
    segment, out = -1, [LayerInfo("embed")]
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node in starts:
            segment = starts[node]
            name = "head" if segment == len(norms) - 1 and len(norms) % 2 == 1 else str(segment // 2)
            if out[-1].name != name:
                out.append(LayerInfo(name))
        info = out[-1]
        info.nodes.append(node)
        info.ops[getattr(getattr(node.target, "overloadpacket", None), "__name__", str(node.target))] += 1
        if (lin := linear_info(gm, node)) is not None:
            info.linears.append(lin)
        if HADAMARD in str(node.target):
            info.online_rotations.append(int(node.args[0].meta["val"].shape[-1]) if "val" in node.args[0].meta else -1)
        info.norm_scales += node in scale_muls
    widths = gm.meta.get(META_KEY, {}).get("mlp_widths", [])
    decoder = [i for i in out if i.name.isdigit()]
    for info, width in zip(decoder, widths):
        down = info.linears[-1] if info.linears else None
        if down is not None:  # a pruned channel had a gate row, an up row and a down column
            info.removed_flops = 2 * 3 * down.out_features * (width["width"] - width["kept"])
    return out


def model_totals(obj) -> dict[str, float]:
    """Linear FLOPs per token, dense FLOPs and weight bytes summed over the decoder layers."""
    infos = [i for i in layers(_graph_of(obj)) if i.name.isdigit()]
    flops = sum(i.flops for i in infos)
    return {"flops": flops, "dense_flops": flops + sum(i.removed_flops for i in infos),
            "weight_bytes": sum(i.weight_bytes for i in infos)}


def tensors_digest(obj) -> str:
    """sha256 (hex) over the names and bytes of every compiled tensor: equal digests, equal bits."""
    digest = hashlib.sha256()
    for name, t in sorted(_graph_of(obj).state_dict().items()):
        digest.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _table(gm: GraphModule, infos: list[LayerInfo]) -> Table:
    meta = gm.meta.get(META_KEY, {})
    # Offline rotations leave no node behind; the passes record them (with their width) in gm.meta.
    offline = ", ".join(f"{r['pass']}({' '.join(filter(None, [r.get('kind'), 'w=%d' % r['width']]))})"
                        for r in meta.get("rotations", []) if "width" in r) or "none"
    table = Table(title=f"{meta.get('architecture', 'graph')} [{meta.get('kind', '?')}] — offline rotations: {offline}")
    for col in ("layer", "nodes", "linears (out×in)", "W/A bits", "MFLOPs/token", "weight KiB", "sparsity",
                "attention", "online rotations", "norm scales"):
        table.add_column(col)
    for info in infos:
        lin = ", ".join(f"{t.split('.')[-2] if '.' in t else t} {lin.out_features}×{lin.in_features}"
                        for lin in info.linears for t in [lin.weight])
        bits = sorted({f"W{lin.w_bits or 'fp'}A{lin.a_bits}" for lin in info.linears})
        rot = ", ".join(f"H{w}" for w in info.online_rotations) or "-"
        table.add_row(info.name, str(len(info.nodes)), lin or "-", " ".join(bits) or "-",
                      f"{info.flops / 1e6:.2f}" if info.linears else "-",
                      f"{info.weight_bytes / 1024:.1f}" if info.linears else "-",
                      f"{info.sparsity:.1%}" if info.name.isdigit() else "-",
                      str(info.ops.get("scaled_dot_product_attention", 0) or "-"), rot, str(info.norm_scales))
    return table


def inspect(obj, layer: int | str | None = None, *, console: Console | None = None) -> list[LayerInfo]:
    """Show a per-layer table (ops, linear shapes, inserted rotations), or one layer's graph.

    ``obj``: a ``CompiledModel`` (its forward graph), a captured ``GraphModule`` or a transformers
    model (captured first). ``layer``: an index, "embed" or "head" to show that layer's nodes.
    Returns the per-layer summaries; output goes to ``console`` (default: a new rich Console).
    """
    gm = _graph_of(obj)
    infos = layers(gm)
    console = console or Console()
    if layer is None:
        console.print(_table(gm, infos))
        return infos
    chosen = [i for i in infos if i.name == str(layer)]
    if not chosen:
        raise ValueError(f"no layer {layer!r}; this graph has {', '.join(i.name for i in infos)}")
    console.print(Text(f"layer {layer}: {len(chosen[0].nodes)} nodes", style="bold"))
    for node in chosen[0].nodes:
        console.print(Text(node.format_node() or node.name), soft_wrap=True)
    return chosen
