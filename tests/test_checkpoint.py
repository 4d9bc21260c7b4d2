"""asaf_fx.save / asaf_fx.load: bit-identical round trips, no unpickling, refusal of bad checkpoints."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

import asaf_fx
from asaf_fx import checkpoint
from asaf_fx._atomic import sha256_file
from asaf_fx.checkpoint import CONFIG_FILE, TENSORS_FILE, CheckpointError

CALIBRATION = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))
CASES = {  # arch -> (QuantConfig, plan sparsity): Llama has searched activation clips (a_clip="mse",
    # pinned in the saved config); Qwen2 adds q/k/v biases, 8-bit weights and overrides
    "llama": (asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", a_clip="mse"), 0.25),
    "qwen2": (asaf_fx.QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_method="rtn", seed=3,
                                  overrides={"model.layers.1.*": {"w_bits": 8}, "*.down_proj.weight": {"a_bits": 4}}),
              0.4),
}


def _compile(model, arch: str):
    quant, sparsity = CASES[arch]
    return asaf_fx.compile(model, asaf_fx.uniform_plan(2, sparsity), quant=quant, calibration=CALIBRATION,
                           prune=asaf_fx.PruneConfig(granularity=16), max_cache_len=24)


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """arch -> (compiled model, checkpoint directory, CheckpointInfo), compiled and saved once."""
    out = {}
    for arch in CASES:
        model = _compile(tiny_models[arch], arch)
        folder = tmp_path_factory.mktemp(f"ckpt-{arch}")
        out[arch] = (model, folder, asaf_fx.save(model, folder))
    return out


@pytest.fixture
def copy_of(saved, tmp_path):
    """``copy_of(arch)``: a scratch copy of a saved checkpoint that the test may damage."""

    def get(arch: str = "llama"):
        target = tmp_path / arch
        shutil.copytree(saved[arch][1], target)
        return target

    return get


def _no_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("asaf_fx.load must not unpickle")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.mark.parametrize("arch", list(CASES))
def test_reload_gives_bit_identical_logits_and_generation(saved, arch, tiny_ids, monkeypatch):
    model, folder, _ = saved[arch]
    _no_unpickling(monkeypatch)
    loaded = asaf_fx.load(folder)
    assert torch.equal(loaded(tiny_ids).logits, model(tiny_ids).logits)
    prompt = tiny_ids[:1, :5]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8), model.generate(prompt, max_new_tokens=8))
    # The cache is chosen when loading, not stored: by default the model's context.
    assert loaded.max_cache_len == 128 and loaded.quant == model.quant and loaded.plan == model.plan
    assert loaded.eos_token_ids == model.eos_token_ids


def test_checkpoint_holds_the_packed_pruned_model(saved):
    model, folder, info = saved["llama"]
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    # 25 % of a layer's linear FLOPs at granularity 16: 64 of 160 MLP channels go
    assert config["graph"]["meta"]["mlp_widths"] == [{"width": 160, "kept": 96}] * 2
    assert "max_cache_len" not in config and config["quant"]["seed"] == 0
    assert set(config["versions"]) == {"asaf_fx", "torch", "transformers"}
    assert info.tensors_bytes == (folder / TENSORS_FILE).stat().st_size
    # 7 linears × 2 layers, two codes per byte: q 96×96, k/v 48×96, o 96×96, gate/up 96×96, down 96×96
    assert info.bytes_by_kind["int4_codes"] == 2 * (96 * 48 + 2 * 48 * 48 + 96 * 48 + 2 * 96 * 48 + 96 * 48)
    assert info.bytes_by_kind["rotations"] > 0 and info.bytes_by_kind["int4_scales"] > 0
    assert sum(info.bytes_by_kind.values()) < info.tensors_bytes  # plus the header
    # one tensor per attribute the graph reads, by its name
    from safetensors import safe_open

    with safe_open(str(folder / TENSORS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert keys | set(config["aliases"]) == set(checkpoint.graph_tensors(model.graph))
    assert set(config["aliases"].values()) <= keys


def test_a_two_graph_checkpoint_is_refused_with_what_to_do(copy_of):
    folder = copy_of()
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    config["schema"] = "asaf_fx.checkpoint/2"
    (folder / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="older asaf_fx.*Compile the model again and save it"):
        asaf_fx.load(folder)


def test_edited_config_is_refused(copy_of):
    folder = copy_of()
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    config["quant"]["a_clip"] = 0.9
    (folder / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="asaf_fx.json was edited after saving"):
        asaf_fx.load(folder)


def test_tensors_from_another_checkpoint_are_refused(copy_of, saved):
    folder = copy_of()
    shutil.copyfile(saved["qwen2"][1] / TENSORS_FILE, folder / TENSORS_FILE)
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded in asaf_fx.json"):
        asaf_fx.load(folder)


def _rewrite_tensors(folder, change) -> None:
    """Rewrite the tensors file with ``change(tensors)`` and re-record its hash: a consistent but wrong pair."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(folder / TENSORS_FILE), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(folder / TENSORS_FILE))
    change(tensors)
    save_file(tensors, str(folder / TENSORS_FILE), metadata=header)
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    config["tensors_sha256"] = sha256_file(folder / TENSORS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")


def test_missing_tensor_is_named(copy_of):
    folder = copy_of()
    victim = "model_layers_0_mlp_down_proj_weight_int4"
    _rewrite_tensors(folder, lambda t: t.pop(victim))
    with pytest.raises(CheckpointError, match=f"lacks tensor {victim} that the graph reads"):
        asaf_fx.load(folder)


@pytest.mark.parametrize("change, match", [
    (lambda t: t.double(), r"is torch.float64 \(96, 1\), the graph reads torch.float32 \(96, 1\)"),
    (lambda t: t[:-1], r"is torch.float32 \(95, 1\), the graph reads torch.float32 \(96, 1\)"),
])
def test_wrong_shape_or_dtype_is_named(copy_of, change, match):
    folder = copy_of()
    key = "model_layers_1_self_attn_o_proj_weight_scales"
    _rewrite_tensors(folder, lambda t: t.update({key: change(t[key])}))
    with pytest.raises(CheckpointError, match=key + " " + match):
        asaf_fx.load(folder)


def test_an_extra_tensor_is_refused(copy_of):
    folder = copy_of()
    _rewrite_tensors(folder, lambda t: t.update({"smuggled": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"holds tensors the graph does not read \(\['smuggled'\]\)"):
        asaf_fx.load(folder)


def test_load_runs_no_capture_and_no_pass(saved, tiny_ids, monkeypatch):
    """The graph comes from the JSON: nothing is exported, no pass rewrites anything."""
    from asaf_fx.passes import infra

    def refuse(*args, **kwargs):
        raise AssertionError("asaf_fx.load must not capture or rewrite")

    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr(infra.PassManager, "__call__", refuse)
    model, folder, _ = saved["qwen2"]
    assert torch.equal(asaf_fx.load(folder)(tiny_ids).logits, model(tiny_ids).logits)


def test_the_file_holds_what_the_graph_reads_and_nothing_else(saved):
    for model, folder, info in saved.values():
        read = {checkpoint._storage_key(t): t.numel() * t.element_size()
                for t in checkpoint.graph_tensors(model.graph).values()}
        assert sum(read.values()) == sum(info.bytes_by_kind.values())
        assert abs(info.tensors_bytes - sum(read.values())) <= 0.01 * info.tensors_bytes + 8192  # + the header


def test_save_refuses_an_existing_checkpoint_unless_asked(saved, copy_of):
    model = saved["llama"][0]
    folder = copy_of()
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        asaf_fx.save(model, folder)
    asaf_fx.save(model, folder, overwrite=True)
    assert torch.equal(asaf_fx.load(folder).graph.model_layers_0_mlp_down_proj_weight_int4,
                       model.graph.model_layers_0_mlp_down_proj_weight_int4)


def test_missing_file_unknown_schema_and_not_a_directory(copy_of, tmp_path):
    folder = copy_of()
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="asaf_fx.json is missing"):
        asaf_fx.load(folder)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        asaf_fx.load(tmp_path / "nowhere")
    folder = copy_of("qwen2")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    config["schema"] = "asaf_fx.checkpoint/99"
    (folder / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="schema 'asaf_fx.checkpoint/99'; this asaf_fx reads"):
        asaf_fx.load(folder)


def test_interrupted_save_leaves_nothing_that_loads(saved, copy_of, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_text_atomic", crash)
    over = copy_of("qwen2")  # overwriting an existing checkpoint with another model
    with pytest.raises(KeyboardInterrupt):
        asaf_fx.save(saved["llama"][0], over, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        asaf_fx.load(over)
    assert [p.name for p in over.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_save_refuses_what_is_not_a_compiled_model(tiny_models, tmp_path):
    with pytest.raises(TypeError, match="CompiledModel that asaf_fx.compile returns"):
        asaf_fx.save(tiny_models["llama"], tmp_path)


def test_compiled_tensors_are_row_major_so_a_save_keeps_their_layout(saved):
    # An orthogonal factor of an odd width built as a transposed view multiplied in another order once
    # saved contiguous: logits after a round trip differed in the last bits (SmolLM2: 4.6e-5).
    for model, _, _ in saved.values():
        assert all(t.is_contiguous() for t in checkpoint.graph_tensors(model.graph).values())
