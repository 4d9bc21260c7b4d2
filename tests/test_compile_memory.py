"""asaf_fx.compile leaks nothing: once the model is deleted, only the compiled graphs' tensors stay alive."""

import gc
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import asaf_fx
from asaf_fx.passes.graph_utils import attr_tensor


def _live_storages() -> dict[int, torch.Tensor]:
    """data_ptr → one live tensor on each real storage (fake and meta tensors own no memory)."""
    gc.collect()
    live = {}
    for obj in gc.get_objects():
        try:
            # type(), not isinstance: isinstance reads __class__, which some deprecated torch objects warn on.
            if not issubclass(type(obj), torch.Tensor) or isinstance(obj, FakeTensor) or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # tensor subclasses without a storage (functional wrappers, ...)
            continue
        if storage.device.type != "meta" and storage.nbytes():
            live.setdefault(storage.data_ptr(), obj)
    return live


def _nbytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _graph_tensors(gm) -> list[torch.Tensor]:
    # Lifted constants (the decode graph's static KV cache) are plain attributes, neither parameters nor buffers.
    read = [attr_tensor(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    return list(gm.parameters()) + list(gm.buffers()) + [t for t in read if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("quant", [
    asaf_fx.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_method="rtn", w_clip_search=False),
    asaf_fx.QuantConfig(rotate=True),  # 16-bit: no lowering pass drops what the rotation replaced
], ids=["w4a4kv4", "rotation-only"])
def test_compile_keeps_only_the_compiled_graphs_tensors(h, quant):
    # Tensors alive before (other tests' fixtures) are held here, so no new storage can reuse their addresses.
    before = _live_storages()
    model = h.make_tiny("llama", seed=3)  # tied embeddings: the original must not outlive the model
    originals = [weakref.ref(p) for p in model.parameters()]
    compiled = asaf_fx.compile(model, quant=quant, max_cache_len=32, backend=None)
    del model
    live = _nbytes(t for ptr, t in _live_storages().items() if ptr not in before)
    own = _nbytes(_graph_tensors(compiled.graph))
    alive = sum(ref() is not None for ref in originals)
    assert alive == 0, f"{alive} of {len(originals)} original parameters are still alive ({live} bytes, need {own})"
    assert abs(live - own) <= 0.05 * own, f"{live} bytes alive, the compiled graph holds {own}"
