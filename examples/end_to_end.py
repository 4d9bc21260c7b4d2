"""The ASAF flow through the Python API: sensitivity table → plan → compressed model → checkpoint.

    python -m asaf_fx.calibrate --model smollm2 --out runs/table.safetensors   # or: python -m asaf_fx run
    python examples/end_to_end.py --model smollm2 --table runs/table.safetensors --out runs/example_model

The table records how it was measured (quantization, calibration text, windows, seed, pruning
granularity); the model is compiled with the same settings on the same windows, so the plan's
predicted degradation refers to the model being built. `python -m asaf_fx run` does all of this
plus the uniform-sparsity baseline and the tighten-and-resolve loop; this script shows the calls.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console

import asaf_fx
from asaf_fx.data import calibration_windows, wikitext2_test_path
from asaf_fx.evaluate import text_perplexity
from asaf_fx.plan import render_plan


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="table → plan → compiled model → checkpoint")
    parser.add_argument("--model", default="smollm2", help="'smollm2', a transformers directory or a .gguf file")
    parser.add_argument("--table", type=Path, required=True, help="a table from python -m asaf_fx.calibrate")
    parser.add_argument("--out", type=Path, default=Path("runs/example_model"), help="checkpoint directory")
    parser.add_argument("--max-degradation", type=float, default=0.01, help="budget in the table's metric")
    parser.add_argument("--eval-text", type=Path, default=None, help="default: the WikiText-2 test split")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    console = Console()

    model, tokenizer = asaf_fx.load_model(args.model)
    table = asaf_fx.SensitivityTable.load(args.table)
    if table.num_layers != model.config.num_hidden_layers:
        parser.error(f"{args.table} has {table.num_layers} layers, the model {model.config.num_hidden_layers}")
    meta = table.meta
    quant = asaf_fx.QuantConfig.from_dict(meta["quant"])

    plan = asaf_fx.solve(table, args.max_degradation, min_sparsity=float(table.sparsities[0]),
                         max_sparsity=float(table.sparsities[-1]), allow_dense=True)
    render_plan(plan, table, console)

    # The windows the table's model was fitted on (calibrate measures ξ on other ones); tables
    # measured before the two counts were separate fitted on as many windows as they measured on.
    fit_windows = meta.get("fit_windows", meta["windows"])
    calibration = calibration_windows(tokenizer, meta["text"], fit_windows, meta["seq_len"], seed=meta["seed"])
    compiled = asaf_fx.compile(model, plan, quant=quant, calibration=calibration,
                               prune=asaf_fx.PruneConfig(granularity=meta["granularity"]))
    asaf_fx.inspect(compiled, console=console)

    eval_text = args.eval_text or wikitext2_test_path()
    ppl = text_perplexity(compiled, tokenizer, eval_text, args.seq_len, args.eval_windows)["perplexity"]
    console.print(f"perplexity on {args.eval_windows} × {args.seq_len} tokens of {eval_text}: {ppl:.4f}")

    info = asaf_fx.save(compiled, args.out, tokenizer=tokenizer)
    reloaded = asaf_fx.load(args.out)
    probe = calibration[:1]
    identical = torch.equal(reloaded(probe).logits, compiled(probe).logits)
    console.print(f"saved {info.tensors_bytes:,} bytes of tensors to {info.path}; reloaded logits identical: "
                  f"{identical}")
    return {"perplexity": ppl, "flops_ratio": plan.flops_ratio, "tensors_bytes": info.tensors_bytes,
            "identical": float(identical)}


if __name__ == "__main__":
    main()
