"""HF ⇄ Megatron parameter conversion for one rank's model, driven by the architecture tables.

HF tensors are read lazily, one at a time, from safetensors (single file or sharded with an
index). Every Megatron parameter of the rank is filled from its table row; anything unmapped,
missing or mis-shaped is an error, never silently skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from megatron_bridge.models import Architecture, Geometry, Kind, ParamMap, to_hf, to_megatron

# Transformer Engine fuses the pre-attention / pre-MLP norms into the next linear layer.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class ConversionError(ValueError):
    pass


class HFWeights:
    """Lazy reader of an HF folder's safetensors (one tensor in memory at a time)."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            self.where = None
        else:
            raise ConversionError(f"{self.dir} has no model.safetensors or "
                                  "model.safetensors.index.json")
        self._open: dict[str, Any] = {}

    def _file(self, name: str):
        fname = self.where.get(name) if self.where is not None else "model.safetensors"
        if fname is None:
            raise ConversionError(f"{self.dir.name}: tensor {name} is in no shard of the index; the "
                                  "checkpoint is incomplete or not this architecture")
        if fname not in self._open:
            path = self.dir / fname
            if not path.is_file():
                raise ConversionError(f"safetensors shard {fname} is missing from {self.dir}; "
                                      "re-download the model")
            try:
                self._open[fname] = safe_open(path, "pt")
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"safetensors shard {fname} is corrupt ({e}); re-download "
                                      "the model") from None
        return self._open[fname]

    def get(self, name: str) -> torch.Tensor:
        f = self._file(name)
        if name not in f.keys():
            raise ConversionError(f"{self.dir.name}: tensor {name} is missing; the checkpoint is "
                                  "incomplete or not this architecture")
        try:
            return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read tensor {name} ({e}); the shard is corrupt: "
                                  "re-download the model") from None


def _table(arch: Architecture) -> dict[str, ParamMap]:
    return {p.megatron: p for p in arch.params}


def param_rows(model, arch: Architecture, tied: bool):
    """(parameter, table row, global layer or None, HF names) for every parameter of the model."""
    table = _table(arch)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    for name, param in model.named_parameters():
        layer = None
        template = name
        if m := _LAYER.match(name):
            local, rest = int(m[1]), m[2]
            layer = layers[local].layer_number - 1  # global index under pipeline parallelism
            template = f"decoder.layers.{{L}}.{TE_ALIASES.get(rest, rest)}"
        row = table.get(template)
        if row is None:
            raise ConversionError(f"megatron parameter {name} has no mapping in the {arch.name} "
                                  "table (megatron_bridge/models)")
        hf_names = tuple(n.format(L=layer) for n in row.hf)
        if tied and template == "output_layer.weight":
            hf_names = ("model.embed_tokens.weight",)
        yield param, row, layer, hf_names


@torch.no_grad()
def load_hf_into_model(model, arch: Architecture, weights: HFWeights, geo: Geometry,
                       tp_rank: int, tied: bool) -> int:
    """Fill every parameter of this rank's model from the HF tensors; returns how many."""
    count = 0
    for param, row, _, hf_names in param_rows(model, arch, tied):
        tensor = to_megatron(row.kind, [weights.get(n) for n in hf_names], geo, tp_rank)
        if tensor.shape != param.shape:
            raise ConversionError(f"{hf_names[0]}: shape {tuple(tensor.shape)} for megatron's "
                                  f"{tuple(param.shape)}; config.json does not match the weights")
        param.copy_(tensor)
        count += 1
    return count


@torch.no_grad()
def hf_tensors_from_model(model, arch: Architecture, geo: Geometry, tied: bool,
                          ) -> dict[str, torch.Tensor]:
    """A TP=1 model's parameters as HF tensors (PP stages each return their own layers)."""
    if geo.tp != 1:
        raise ValueError("export gathers by loading the checkpoint at TP=1")
    out: dict[str, torch.Tensor] = {}
    for param, row, _, hf_names in param_rows(model, arch, tied):
        if tied and row.megatron == "output_layer.weight":
            continue  # the embedding, exported once
        for name, tensor in zip(hf_names, to_hf(row.kind, [param.detach()], geo)):
            out[name] = tensor.contiguous().clone()
    return out


__all__ = ["ConversionError", "HFWeights", "Kind", "hf_tensors_from_model", "load_hf_into_model",
           "param_rows"]


# -- whole-checkpoint operations ----------------------------------------------------------------
def hf_to_mcore(hf_dir: Path, out: Path, tp: int, pp: int, dtype: str = "source") -> dict[str, Any]:
    """Collective (all ranks of a TP×PP world): convert an HF folder to a torch_dist checkpoint."""
    from megatron.core import parallel_state as ps

    from megatron_bridge import checkpoint
    from megatron_bridge.build import DTYPES, build_model, check_layout, geometry, hf_dtype, read_hf_config
    from megatron_bridge.models import architecture_for
    from megatron_bridge.parallel import model_parallel

    hf = read_hf_config(hf_dir)
    arch = architecture_for(hf)
    check_layout(hf, tp, pp)
    weights = HFWeights(hf_dir)
    torch_dtype = hf_dtype(hf) if dtype == "source" else DTYPES[dtype]
    tied = bool(hf.get("tie_word_embeddings", False))
    with model_parallel(tp, pp):
        model = build_model(hf, tp, pp, torch_dtype)
        geo = geometry(hf, tp)
        load_hf_into_model(model, arch, weights, geo, ps.get_tensor_model_parallel_rank(), tied)
        metadata = {"architecture": arch.name, "hf_config": hf, "vocab_size": geo.vocab_size,
                    "padded_vocab_size": geo.padded_vocab_size, "dtype": str(torch_dtype).split(".")[-1],
                    "tensor_parallel": tp, "pipeline_parallel": pp}
        checkpoint.save(model, out, "release", metadata)
    return metadata


def mcore_to_hf(mcore_dir: Path, out: Path, hf_base: Path | None = None,
                max_shard_bytes: int = 5 * 1024**3) -> dict[str, Any]:
    """Load any TP/PP checkpoint at TP1/PP1 (dist_checkpointing reshards), unpad the vocab and
    write safetensors (sharded with an index when large), config.json and tokenizer files."""
    import shutil

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from megatron_bridge import checkpoint
    from megatron_bridge.build import DTYPES, build_model, geometry
    from megatron_bridge.models import architecture_for
    from megatron_bridge.parallel import model_parallel

    meta = checkpoint.read_metadata(mcore_dir)
    hf = dict(meta["hf_config"])
    if hf_base is not None:
        base = json.loads((Path(hf_base) / "config.json").read_text())
        keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "intermediate_size")
        if diff := [k for k in keys if base.get(k) != hf.get(k)]:
            raise ConversionError(f"--hf-base {hf_base} is a different model ({', '.join(diff)} "
                                  "differ from the checkpoint's source config)")
    arch = architecture_for(hf)
    dtype = DTYPES[meta["dtype"]]
    tied = bool(hf.get("tie_word_embeddings", False))
    with model_parallel(1, 1):
        model = build_model(hf, 1, 1, dtype)
        checkpoint.load(model, mcore_dir)
        tensors = hf_tensors_from_model(model, arch, geometry(hf, 1), tied)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if hf_base is not None:
        for f in Path(hf_base).iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template",
                                                    "generation_config", "vocab", "merges"))):
                shutil.copyfile(f, out / f.name)
    return {"tensors": len(tensors), "shards": len(split.filename_to_tensors)}
