"""Is one query head cheaper, per linear FLOP, than as many MLP channels? FP32 SmolLM2, validation text.

    python benchmarks/head_probe.py

In layers 0, 4, …, 29 of the float32 model, removes one query head at a time (its o_proj input
columns zeroed: the head's output is gone, so its q_proj rows and o_proj columns could go too) and,
separately, the 43 MLP channels of least E[h²]·‖W_down[:, j]‖² (fitted on 8 × 256 validation
tokens): 43 · 3 · 576 ≈ 2 · 64 · 576 linear MACs per token, one head's worth. Prints each removal's
relative perplexity rise on 8 other validation windows of 256 tokens (the calibration meter's size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import asaf_fx
from asaf_fx.data import calibration_windows, wikitext2_valid_path

LAYERS = (0, 4, 8, 12, 16, 20, 24, 29)


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = asaf_fx.load_model("smollm2")
    model.eval()
    windows = calibration_windows(tokenizer, wikitext2_valid_path(), 16, 256, seed=0)
    fit, held = windows[:8], windows[8:]
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    layers = model.model.layers

    def nll() -> float:
        total = 0.0
        with torch.no_grad():
            for batch in held.split(4):
                logits = model(batch).logits.float()
                total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               batch[:, 1:].reshape(-1), reduction="sum"))
        return total / held[:, 1:].numel()

    squares: dict[int, torch.Tensor] = {}

    def record(index: int):
        def hook(module, args, output):
            squares[index] = squares.get(index, 0) + (args[0].double() ** 2).sum((0, 1))
        return hook

    hooks = [layer.mlp.down_proj.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for batch in fit.split(4):
            model(batch)
    for hook in hooks:
        hook.remove()
    base = nll()
    channels = round(2 * head_dim * config.hidden_size / (3 * config.hidden_size))
    macs = 2 * head_dim * config.hidden_size
    print(f"base NLL {base:.5f}; one head = {macs} linear MACs/token = {channels} channels")
    for index in LAYERS:
        o_proj, down = layers[index].self_attn.o_proj.weight.data, layers[index].mlp.down_proj.weight.data
        heads = []
        for head in range(config.num_attention_heads):
            columns = slice(head * head_dim, (head + 1) * head_dim)
            kept = o_proj[:, columns].clone()
            o_proj[:, columns] = 0
            heads.append(math.expm1(nll() - base))
            o_proj[:, columns] = kept
        drop = torch.argsort(squares[index] * (down.double() ** 2).sum(0))[:channels]
        kept = down[:, drop].clone()
        down[:, drop] = 0
        mlp = math.expm1(nll() - base)
        down[:, drop] = kept
        ranked = sorted(heads)
        print(f"layer {index:2d}: {channels} MLP channels {mlp:+.4%}; heads min {ranked[0]:+.4%} "
              f"median {ranked[len(ranked) // 2]:+.4%} max {ranked[-1]:+.4%}; "
              f"heads cheaper than the channels: {sum(h < mlp for h in heads)}/{len(heads)}")


if __name__ == "__main__":
    main()
