"""SHA-256 of SmolLM2's logits on the first 512 test tokens, compiled three ways: a fingerprint that
tells whether two commits compute the same model bit for bit (run both on one machine).

    python benchmarks/logit_digest.py

Settings: rotation only; W4A8KV8 RTN; W4A8KV8 GPTQ with uniform 10 % sparsity and the down_proj
refit, fitted on 8 × 256 validation tokens (seed 0). One torch thread, so the float sums do not
depend on how work is split. Uses only API that has been stable since the first checkpoint format,
so the same file runs at older commits.
"""

import hashlib

import torch

import asaf_fx
from asaf_fx.data import calibration_windows, read_joined, token_windows, wikitext2_test_path, wikitext2_valid_path


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = asaf_fx.load_model("smollm2")
    ids = token_windows(tokenizer, read_joined(wikitext2_test_path()), 512, 1)
    calibration = calibration_windows(tokenizer, wikitext2_valid_path(), n_windows=8, seq_len=256, seed=0)
    settings = {
        "rotate": (None, asaf_fx.QuantConfig(), None),
        "w4a8kv8-rtn": (None, asaf_fx.QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_method="rtn"), None),
        "w4a8kv8-gptq-uniform10": (asaf_fx.uniform_plan(model.config.num_hidden_layers, 0.1),
                                   asaf_fx.QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_method="gptq"), calibration),
    }
    for name, (plan, quant, cal) in settings.items():
        compiled = asaf_fx.compile(model, plan, quant=quant, calibration=cal)
        with torch.no_grad():
            logits = compiled(ids).logits
        print(f"{name}: {hashlib.sha256(logits.numpy().tobytes()).hexdigest()}", flush=True)


if __name__ == "__main__":
    main()
