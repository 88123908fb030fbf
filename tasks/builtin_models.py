"""Built-in models (`builtin:NAME` sources): deterministic random-weight HF folders with a real
tokenizer, so the whole pipeline runs on a CPU box with no hub access."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

from megatron_bridge.files import follow_umask
from settings.errors import UserError
from tasks.artifacts import sha256_file

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
R1_DISTILL_QWEN = EXAMPLES_DIR / "tokenizers" / "deepseek-r1-distill-qwen-1.5b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# name → (folder holding the real config + tokenizer, config overrides that shrink it, seed)
BUILTIN_MODELS: dict[str, tuple[Path, dict[str, Any], int]] = {
    "tiny-qwen2": (
        R1_DISTILL_QWEN,
        # DeepSeek-R1-Distill-Qwen-1.5B's geometry, shrunk: QKV bias, untied, 2 KV groups, bf16.
        {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_window_layers": 2},
        0,
    ),
}


def builtin_spec(name: str) -> tuple[Path, dict[str, Any], int]:
    if name not in BUILTIN_MODELS:
        raise UserError(
            f"download.source: unknown built-in model 'builtin:{name}'; built-ins: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        )
    folder, overrides, seed = BUILTIN_MODELS[name]
    if not (folder / "config.json").is_file():
        raise UserError(
            f"built-in model files are missing at {folder}; run from a source checkout "
            "installed with `pip install -e .`"
        )
    return folder, overrides, seed


def builtin_fingerprint(name: str) -> dict[str, Any]:
    """The shipped files and the libraries that generate the weights decide the output (versions
    read from package metadata: importing torch here would cost seconds on every cached run)."""
    folder, overrides, seed = builtin_spec(name)
    files = {f: sha256_file(folder / f)[:16] for f in ("config.json", *TOKENIZER_FILES)}
    return {"builtin": name, "overrides": overrides, "seed": seed, "files": files,
            "torch": version("torch").split("+")[0], "transformers": version("transformers")}


def builtin_config(name: str) -> dict[str, Any]:
    """The built-in model's config.json as `build_builtin` writes it (the geometry fields)."""
    folder, overrides, _ = builtin_spec(name)
    return {**json.loads((folder / "config.json").read_text()), **overrides}


def build_builtin(name: str, out: Path) -> dict[str, Any]:
    """Write the built-in model as an HF folder (safetensors, config, real tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, overrides, seed = builtin_spec(name)
    base = json.loads((folder / "config.json").read_text())
    dtype = base.get("torch_dtype") or base.get("dtype") or "float32"
    fields = {k: v for k, v in base.items() if k not in {"model_type", "transformers_version"}}
    config = AutoConfig.for_model(base["model_type"], **{**fields, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    for weights in Path(out).glob("*.safetensors"):
        follow_umask(weights)
    for f in TOKENIZER_FILES:
        shutil.copyfile(folder / f, out / f)  # the real generation config, not a generated one
    n_params = sum(p.numel() for p in model.parameters())
    return {"builtin": name, "parameters": n_params, "dtype": dtype}
