"""Uniform sparsity at the FLOPs of any round of a ``python -m asaf_fx run`` output, against that round.

    python benchmarks/uniform_at_round.py OUT_DIR [--round N]

The pipeline compares the plan it keeps with uniform sparsity at equal FLOPs; this does the same for
any round it measured (default 1: the plan solved at the full budget), rebuilding the uniform model
exactly as the pipeline builds its models (``summary.json``'s model, quantization, granularity,
calibration and evaluation windows) and reporting its degradation against the summary's
``ppl_base``. Prints one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import asaf_fx
from asaf_fx.data import calibration_windows, perplexity, token_windows
from asaf_fx.evaluate import read_text
from asaf_fx.inspection import model_totals
from asaf_fx.sparsity_plan import uniform_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", type=Path, help="a `python -m asaf_fx run --out` directory")
    parser.add_argument("--round", type=int, default=1, help="which measured round (default 1)")
    args = parser.parse_args()
    summary = json.loads((args.out / "summary.json").read_text())
    measured = {r["round"]: r for r in summary["rounds"] if "measured_degradation" in r}
    if args.round not in measured:
        parser.error(f"{args.out} has no measured round {args.round}; measured rounds: {sorted(measured)}")
    chosen = measured[args.round]
    table = asaf_fx.SensitivityTable.load(args.out / summary["files"]["table"])

    model, tokenizer = asaf_fx.load_model(summary["model"])
    calibration = calibration_windows(tokenizer, summary["calibration_text"], summary["calibration_windows"],
                                      summary["calibration_seq_len"], seed=table.meta["seed"])
    evaluation = token_windows(tokenizer, read_text(summary["eval_text"]), summary["seq_len"], summary["eval_windows"])
    sparsity = 1.0 - chosen["flops_ratio"]
    compiled = asaf_fx.compile(model, uniform_plan(table.num_layers, sparsity, table.dense_flops),
                               quant=asaf_fx.QuantConfig.from_dict(summary["quant"]), calibration=calibration,
                               prune=asaf_fx.PruneConfig(granularity=summary["granularity"]), decode=False)
    totals = model_totals(compiled)
    ppl = perplexity(lambda ids: compiled(ids).logits, evaluation)
    print(f"round {args.round}: ASAF FLOPs ×{chosen['flops_ratio']:.4f} PPL {chosen['ppl']:.3f} "
          f"({chosen['measured_degradation']:+.2%}) · uniform {sparsity:.4f} → FLOPs ×"
          f"{totals['flops'] / totals['dense_flops']:.4f} PPL {ppl:.3f} ({ppl / summary['ppl_base'] - 1:+.2%}) · "
          f"base {summary['ppl_base']:.3f} · {evaluation.shape[0]} windows × {summary['seq_len']}")


if __name__ == "__main__":
    main()
