"""``asaf_fx.inspect``: a per-layer view of a captured or compiled model's graph.

Layers are found by pattern, like the passes: the graph is cut at each RMSNorm, and a pre-norm
transformer layer is two consecutive segments (attention, MLP). Whatever precedes the first norm is
"embed"; the segment of the final norm is "head". (Named ``inspection`` because a module called
``inspect`` shadows the standard library in some tools.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch.fx import GraphModule, Node

from asaf_fx.passes.graph_utils import aten, get_tensor, is_linear, is_op
from asaf_fx.passes.infra import META_KEY
from asaf_fx.passes.patterns import find_rmsnorms

HADAMARD = "asaf_fx.hadamard_rotate"


@dataclass
class LayerInfo:
    name: str  # "embed", "0", "1", ..., "head"
    nodes: list[Node] = field(default_factory=list)
    linears: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (weight name, (out, in))
    online_rotations: list[int] = field(default_factory=list)  # widths of hadamard_rotate nodes
    norm_scales: int = 0  # RMSNorm scale multiplies still in the graph (0 once folded)
    ops: Counter = field(default_factory=Counter)


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
        if is_linear(node):
            info.linears.append((node.args[1].target, tuple(get_tensor(gm, node.args[1]).shape)))
        if HADAMARD in str(node.target):
            info.online_rotations.append(int(node.args[0].meta["val"].shape[-1]) if "val" in node.args[0].meta else -1)
        info.norm_scales += node in scale_muls
    return out


def _table(gm: GraphModule, infos: list[LayerInfo]) -> Table:
    meta = gm.meta.get(META_KEY, {})
    offline = ", ".join(f"{r['pass']}({r.get('kind', '')} w={r['width']})" for r in meta.get("rotations", [])
                        if "width" in r) or "none"
    table = Table(title=f"{meta.get('architecture', 'graph')} [{meta.get('kind', '?')}] — offline rotations: {offline}")
    for col in ("layer", "nodes", "linears (out×in)", "attention", "online rotations", "norm scales"):
        table.add_column(col)
    for info in infos:
        lin = ", ".join(f"{t.split('.')[-2] if '.' in t else t} {s[0]}×{s[1]}" for t, s in info.linears)
        rot = ", ".join(f"H{w}" for w in info.online_rotations) or "-"
        table.add_row(info.name, str(len(info.nodes)), lin or "-",
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
