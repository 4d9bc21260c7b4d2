"""``asaf_fx.inspect``: what a captured or compiled model's graph computes, readable at 80 columns.

Layers are found by pattern, like the passes: the graph is cut at each RMSNorm, and a pre-norm
transformer layer is two consecutive segments (attention, MLP). Whatever precedes the first norm is
"embed"; the segment of the final norm is "head". The summary shows one row per layer kind:
consecutive decoder layers that run the same ops on the same linear shapes and bits are merged
("0–29 (30)"); then each kind's linear shapes, and the passes applied with what they recorded in
``gm.meta["asaf_fx"]``. ``inspect(model, layer=N)`` lists layer N node by node (op, output shape,
inputs). (Named ``inspection`` because a module called ``inspect`` shadows the standard library in
some tools.)
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch.fx import GraphModule, Node

import asaf_fx.triton_kernels.ops  # noqa: F401  registers torch.ops.asaf_fx (the INT4 linears inspected)
from asaf_fx.passes.graph_utils import aten, get_tensor, is_linear, is_op
from asaf_fx.passes.infra import META_KEY
from asaf_fx.passes.patterns import find_rmsnorms

HADAMARD = "asaf_fx.hadamard_rotate"
INT4_LINEARS = (torch.ops.asaf_fx.w4a16_linear, torch.ops.asaf_fx.w4a_int_linear)


@dataclass(frozen=True)
class LinearInfo:
    """One linear as the graph runs it, measured from the tensors it reads."""

    weight: str  # the weight's name as captured ("model.layers.0.mlp.down_proj.weight"); stacked
    # weights (one call for q/k/v or gate/up) are named together: "model.layers.0.mlp.gate_proj+up_proj.weight"
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


def _op_name(node: Node) -> str:
    """The op's short name: ``linear``, ``w4a_int_linear``, ``getitem``, a method's name."""
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(node.target, "__name__", str(node.target))


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
        tag = node.meta.get("asaf_fx", {})
        return LinearInfo(
            _stacked_name(tag["stacked_weights"]) if "stacked_weights" in tag else tag.get("weight", packed.target),
            int(get_tensor(gm, packed).shape[0]),
            int(node.args[0].meta["val"].shape[-1]),
            4,
            _input_bits(node.args[0]) if int_input else 16,
            _bytes(gm, packed) + _bytes(gm, scales) + _bytes(gm, bias),
        )
    return None


def _stacked_name(weights: list[str]) -> str:
    """"a.q_proj.weight", "a.k_proj.weight" -> "a.q_proj+k_proj.weight"."""
    parents = [w.rsplit(".", 2) for w in weights]
    return f"{parents[0][0]}.{'+'.join(p[1] for p in parents)}.weight"


def _graph_of(obj) -> GraphModule:
    from asaf_fx.compiled_model import CompiledModel

    if isinstance(obj, CompiledModel):
        return obj.graph
    if isinstance(obj, GraphModule):
        return obj
    if isinstance(obj, torch.nn.Module) and hasattr(obj, "config"):
        from asaf_fx.passes.capture import capture

        return capture(obj)
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
        info.ops[_op_name(node)] += 1
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


def _num(value: float, units: tuple[tuple[float, str], ...]) -> str:
    scale, unit = next(((s, u) for s, u in units if abs(value) >= s), units[-1])
    v = value / scale
    return f"{v:.{2 if abs(v) < 10 else 1 if abs(v) < 100 else 0}f} {unit}".rstrip()


FLOP_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
BYTE_UNITS = ((2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"), (1.0, "B"))


def _bits(lin: LinearInfo) -> str:
    return f"W{lin.w_bits or 'fp'}A{lin.a_bits}"


def _linear_name(weight: str) -> str:
    # Display only: "model.layers.0.self_attn.q_proj.weight" -> "q" (the shape says the rest).
    parts = weight.split(".")
    return "+".join(p.removesuffix("_proj") for p in (parts[-2] if len(parts) > 1 else weight).split("+"))


def _runs(gm: GraphModule, infos: list[LayerInfo]) -> list[tuple[str, list[LayerInfo], tuple[str, ...]]]:
    """(label, layers, row cells) per run of consecutive decoder layers that compute the same thing."""
    meta = gm.meta.get(META_KEY, {})
    widths = iter(meta.get("mlp_widths", []))
    runs: list[tuple[list[LayerInfo], tuple, tuple[str, ...]]] = []
    for info in infos:
        width = next(widths, None) if info.name.isdigit() else None
        cells = (" ".join(sorted({_bits(lin) for lin in info.linears})) or "-",
                 _num(info.flops, FLOP_UNITS) if info.linears else "-",
                 _num(info.weight_bytes, BYTE_UNITS) if info.linears else "-",
                 f"{width['kept']}/{width['width']}" if width else "-",
                 " ".join(map(str, info.online_rotations)) or "-")
        # Equal rows are not enough to merge: the layers must also run the same ops on the same shapes.
        key = (cells, info.norm_scales, sorted(info.ops.items()),
               [(_linear_name(lin.weight), lin.out_features, lin.in_features, _bits(lin), lin.weight_bytes)
                for lin in info.linears])
        if info.name.isdigit() and runs and runs[-1][0][-1].name.isdigit() and runs[-1][1] == key:
            runs[-1][0].append(info)
        else:
            runs.append(([info], key, cells))
    return [(run[0].name if len(run) == 1 else f"{run[0].name}–{run[-1].name} ({len(run)})", run, cells)
            for run, _, cells in runs]


def _table(gm: GraphModule, infos: list[LayerInfo], runs: list[tuple[str, list[LayerInfo], tuple[str, ...]]]) -> Table:
    meta = gm.meta.get(META_KEY, {})
    decoder = [i for i in infos if i.name.isdigit()]
    flops = sum(i.flops for i in decoder)
    dense = flops + sum(i.removed_flops for i in decoder)
    caption = f"rows: per layer; total: all decoder layers (dense {_num(dense, FLOP_UNITS)}FLOP/tok"
    caption += f", FLOP ratio {flops / dense:.3f})" if dense else ")"
    if scales := sum(i.norm_scales for i in infos):
        caption += f"; {scales} RMSNorm scale multiplies not folded"
    table = Table(title=Text(f"{meta.get('architecture', 'graph')} [{meta.get('kind', '?')}]"),
                  caption=Text(caption), caption_justify="left", box=box.SIMPLE_HEAD)
    for col, justify in (("layers", "left"), ("W/A", "left"), ("FLOP/tok", "right"), ("weights", "right"),
                         ("MLP kept", "right"), ("online H", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for label, _, cells in runs:
        table.add_row(*map(Text, (label, *cells)))
    table.add_section()
    widths = meta.get("mlp_widths", [])
    kept = f"{sum(w['kept'] for w in widths)}/{sum(w['width'] for w in widths)}" if widths else "-"
    bits = " ".join(sorted({_bits(lin) for i in decoder for lin in i.linears})) or "-"
    table.add_row(*map(Text, ("total", bits, _num(flops, FLOP_UNITS), _num(sum(i.weight_bytes for i in decoder),
                                                                            BYTE_UNITS), kept, "")))
    return table


def _wrap(head: str, items: list[str], width: int, indent: str = "    ") -> str:
    """``head`` then ``items`` comma-separated, broken between items to fit ``width`` cells."""
    lines, line = [], head
    for k, item in enumerate(items):
        item += "," if k < len(items) - 1 else ""
        if cell_len(f"{line} {item}") > width and line != head:
            lines.append(line)
            line = indent + item
        else:
            line = f"{line} {item}"
    return "\n".join([*lines, line])


# The parameters a pass records in gm.meta, under which key, and how to show them.
PASS_META = {
    "prune_mlp": ("mlp_widths", lambda ws: f"{sum(w['kept'] for w in ws)}/{sum(w['width'] for w in ws)} kept"),
    "quantize_kv": ("kv_cache", lambda kv: " ".join([f"{kv['bits']} bits"]
                                                    + ([f"g={kv['group_size']}"] if kv.get("group_size") else []))),
    "lower_linears": ("lowered", lambda low: f"{low['int4']}/{low['linears']} int4"),
}


def _passes(meta: dict) -> list[str]:
    """The passes applied, in order, each with what it recorded ("rotate_residual(hadamard w=96)")."""
    rotations: dict[str, list[dict]] = {}
    for r in meta.get("rotations", []):
        rotations.setdefault(r["pass"], []).append(r)
    out = []
    for name in meta.get("passes", []):
        params = []
        if rotations.get(name):
            r = rotations[name].pop(0)
            params = [r.get("kind"), f"w={r['width']}" if "width" in r else None,
                      f"×{r['count']}" if "count" in r else None, f"seed={r['seed']}" if r.get("seed") else None]
        if name in PASS_META and PASS_META[name][0] in meta:
            params.append(PASS_META[name][1](meta[PASS_META[name][0]]))
        params = [p for p in params if p]
        out.append(f"{name}({' '.join(params)})" if params else name)
    return out


def _show_model(gm: GraphModule, infos: list[LayerInfo], console: Console) -> None:
    runs = _runs(gm, infos)
    console.print(_table(gm, infos, runs))
    lines = ["linears (out×in):"]
    for label, run, _ in runs:
        lins = run[0].linears
        mixed = len({_bits(lin) for lin in lins}) > 1  # else the row's W/A column says it
        items = [f"{_linear_name(lin.weight)} {lin.out_features}×{lin.in_features}"
                 + (f" {_bits(lin)}" if mixed else "") for lin in lins]
        if items:
            lines.append(_wrap(f"  {label}:", items, console.width))
    lines.append(_wrap("passes:", _passes(gm.meta.get(META_KEY, {})) or ["none"], console.width, indent="  "))
    console.print(Text("\n".join(lines)))


def _name(node: Node) -> str:
    """A node's name, short enough for an 80-column table."""
    if node.op == "get_attr":
        # Display only: the layer index is the table's subject; what follows names the tensor.
        name = re.sub(r"^.*?layers_\d+_(?:self_attn_|mlp_)?", "", str(node.target)).removeprefix("asaf_")
        return name.replace("_weight_", "_")
    name, op = node.name.replace("_default", ""), _op_name(node)
    if len(name) > 18 and name.startswith(op):  # the op column spells it out: "sdpa_1", "qpt_2"
        name = "".join(word[0] for word in op.split("_") if word) + name[len(op):]
    return name


def _shape(val: object) -> str:
    if isinstance(val, torch.Tensor):
        return "×".join(map(str, val.shape)) or "scalar"
    if isinstance(val, (tuple, list)):
        return ", ".join(_shape(v) for v in val)
    return "-" if val is None else str(val)


def _arg(arg: object) -> str:
    if isinstance(arg, Node):
        return _name(arg)
    if isinstance(arg, (tuple, list)):
        return "[" + ", ".join(map(_arg, arg)) + "]"
    if isinstance(arg, int) and abs(arg) >= 2**62:  # slice(x, dim, start, sys.maxsize): to the end
        return "max"
    if isinstance(arg, torch.dtype):
        return str(arg).removeprefix("torch.")
    return f"{arg:g}" if isinstance(arg, float) else str(arg)


def _node_table(info: LayerInfo) -> Table:
    # Rich narrows the columns to the console, wrapping inputs between names; a bound on the shape
    # column keeps a multi-output op's shapes from taking the width the inputs need.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("node", overflow="fold")
    table.add_column("op", overflow="fold")
    table.add_column("shape", overflow="fold", max_width=14)
    table.add_column("inputs", overflow="fold")
    for node in info.nodes:
        inputs = [a for a in node.args if a is not None] + [v for v in node.kwargs.values() if isinstance(v, Node)]
        table.add_row(*map(Text, (_name(node), _op_name(node), _shape(node.meta.get("val")),
                                  ", ".join(map(_arg, inputs)))))
    return table


def inspect(obj, layer: int | str | None = None, *, console: Console | None = None) -> list[LayerInfo]:
    """Show one row per layer kind, the linear shapes and the passes applied; or one layer node by node.

    ``obj``: a ``CompiledModel`` (its forward graph), a captured ``GraphModule`` or a transformers
    model (captured first). ``layer``: an index, "embed" or "head" to show that layer's nodes.
    Returns the per-layer summaries; output goes to ``console`` (default: a new rich Console).
    """
    gm = _graph_of(obj)
    infos = layers(gm)
    console = console or Console()
    if layer is None:
        _show_model(gm, infos, console)
        return infos
    chosen = [i for i in infos if i.name == str(layer)]
    if not chosen:
        raise ValueError(f"no layer {layer!r}; this graph has {', '.join(i.name for i in infos)}")
    console.print(Text(f"layer {layer}: {len(chosen[0].nodes)} nodes", style="bold"))
    console.print(_node_table(chosen[0]))
    return chosen
