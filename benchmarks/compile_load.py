"""Seconds to compile, save and load a model, the checkpoint's size, and whether the round trip is exact.

    python benchmarks/compile_load.py [--model smollm2] [--quant rotate w4a4kv4 w4a8kv8] [--out DIR]

Prints one table row per setting: ``asaf_fx.compile`` wall time (rotation only, or W4A4KV4 /
W4A8KV8 with RTN weights: GPTQ would time the calibration, not the compile), ``asaf_fx.save`` and
``asaf_fx.load`` wall time, the tensors file's bytes against the bytes the compiled graph reads,
and the largest logit difference and greedy-token agreement after the round trip (0 and all: bit
for bit).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import asaf_fx
from asaf_fx import checkpoint

QUANTS = {
    "rotate": asaf_fx.QuantConfig(),
    "w4a4kv4": asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", a_clip=0.9),
    "w4a8kv8": asaf_fx.QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_method="rtn"),
}


def measure(model, tokenizer, name: str, folder: Path) -> list[str]:
    started = time.perf_counter()
    compiled = asaf_fx.compile(model, quant=QUANTS[name])
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    info = asaf_fx.save(compiled, folder / name)
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = asaf_fx.load(folder / name)
    load_s = time.perf_counter() - started
    read = {checkpoint._storage_key(t): t.numel() * t.element_size()
            for t in checkpoint.graph_tensors(compiled.graph).values()}
    ids = tokenizer("The tower is 324 metres tall, about the same height as", return_tensors="pt").input_ids
    with torch.no_grad():
        delta = float((loaded(ids).logits - compiled(ids).logits).abs().max())
    same = torch.equal(loaded.generate(ids, max_new_tokens=16), compiled.generate(ids, max_new_tokens=16))
    return [name, f"{compile_s:.1f}", f"{save_s:.1f}", f"{load_s:.1f}", f"{info.tensors_bytes / 2**20:.1f}",
            f"{sum(read.values()) / 2**20:.1f}", f"{delta:.3g}", "yes" if same else "no"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--quant", choices=sorted(QUANTS), nargs="+", default=sorted(QUANTS))
    parser.add_argument("--out", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args(argv)
    model, tokenizer = asaf_fx.load_model(args.model)
    table = Table(title=f"compile / save / load: {args.model} ({torch.get_num_threads()} torch threads)")
    for column in ("quant", "compile s", "save s", "load s", "file MiB", "graph reads MiB", "max |Δlogit|",
                   "same tokens"):
        table.add_column(column, justify="left" if column == "quant" else "right")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or Path(scratch)
        for name in args.quant:
            table.add_row(*measure(model, tokenizer, name, folder))
    Console().print(table)


if __name__ == "__main__":
    main()
