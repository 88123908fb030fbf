"""HF ⇄ Megatron parameter conversion for one rank's model, driven by the architecture tables.

HF tensors are read lazily, one at a time, from safetensors (single file or sharded with an
index). Every Megatron parameter of the rank is filled from its table row; anything unmapped,
missing or mis-shaped is an error, never silently skipped.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from megatron_bridge import checkpoint
from megatron_bridge.files import follow_umask, staged_output
from megatron_bridge.build import DTYPES, build_model, check_layout, geometry, hf_dtype, param_rows, read_hf_config
from settings.errors import UserError

from megatron_bridge.models import Architecture, Geometry, architecture_for, to_hf, to_megatron
from megatron_bridge.parallel import model_parallel



SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class HFWeights:
    """Reads an HF folder's safetensors one tensor at a time with plain file reads.

    Not mmap: pages of a memory-mapped shard stay resident (and counted in RSS) until the file is
    closed, so converting a one-shard model would hold it twice. Reading into a fresh tensor keeps
    the peak at the model plus one tensor.
    """

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            self.where = None
        else:
            raise UserError(f"{self.dir} has no model.safetensors or "
                                  "model.safetensors.index.json")
        self._headers: dict[str, tuple[dict[str, Any], int]] = {}

    def _header(self, fname: str) -> tuple[dict[str, Any], int]:
        if fname not in self._headers:
            path = self.dir / fname
            if not path.is_file():
                raise UserError(f"safetensors shard {fname} is missing from {self.dir}; "
                                      "re-download the model")
            size = path.stat().st_size
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    if length > size - 8:
                        raise ValueError("header longer than the file")
                    header = json.loads(f.read(length))
                header.pop("__metadata__", None)
                end = max((e["data_offsets"][1] for e in header.values()), default=0)
                if 8 + length + end > size:
                    raise ValueError(f"data ends at byte {8 + length + end}, file has {size}")
            except (ValueError, struct.error, KeyError, TypeError) as e:
                raise UserError(f"safetensors shard {fname} is corrupt ({e}); re-download "
                                      "the model") from None
            self._headers[fname] = (header, 8 + length)
        return self._headers[fname]

    def get(self, name: str) -> torch.Tensor:
        fname = self.where.get(name) if self.where is not None else "model.safetensors"
        if fname is None:
            raise UserError(f"{self.dir.name}: tensor {name} is in no shard of the index; the "
                                  "checkpoint is incomplete or not this architecture")
        header, base = self._header(fname)
        if name not in header:
            raise UserError(f"{self.dir.name}: tensor {name} is missing; the checkpoint is "
                                  "incomplete or not this architecture")
        entry = header[name]
        start, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        if end > start:
            with open(self.dir / fname, "rb") as f:
                f.seek(base + start)
                f.readinto(tensor.view(-1).view(torch.uint8).numpy())
        return tensor


@torch.no_grad()
def load_hf_into_model(model, arch: Architecture, weights: HFWeights, geo: Geometry,
                       tp_rank: int, tied: bool) -> int:
    """Fill every parameter of this rank's model from the HF tensors; returns how many."""
    count = 0
    for param, row, hf_names in param_rows(model, arch, tied):
        tensor = to_megatron(row.kind, [weights.get(n) for n in hf_names], geo, tp_rank)
        if tensor.shape != param.shape:
            raise UserError(f"{hf_names[0]}: shape {tuple(tensor.shape)} for megatron's "
                                  f"{tuple(param.shape)}; config.json does not match the weights")
        param.copy_(tensor)
        count += 1
    return count


@torch.no_grad()
def hf_tensors_from_model(model, arch: Architecture, geo: Geometry, tied: bool,
                          ) -> dict[str, torch.Tensor]:
    """A TP=1 model's parameters as HF tensors (PP stages each return their own layers). Consumes
    the model: a parameter that had to be copied (fused kinds) is freed once exported."""
    if geo.tp != 1:
        raise ValueError("export gathers by loading the checkpoint at TP=1")
    out: dict[str, torch.Tensor] = {}
    for param, row, hf_names in param_rows(model, arch, tied):
        if tied and row.megatron == "output_layer.weight":
            continue  # the embedding, exported once
        tensors = [t.contiguous() for t in to_hf(row.kind, [param.detach()], geo)]
        out.update(zip(hf_names, tensors))
        if all(t.untyped_storage().data_ptr() != param.untyped_storage().data_ptr() for t in tensors):
            param.data = param.data.new_empty(0)  # a copy was made: free the original now
    return out



# -- whole-checkpoint operations ----------------------------------------------------------------
def hf_to_mcore(hf_dir: Path, out: Path, tp: int, pp: int, dtype: str = "source") -> dict[str, Any]:
    """Collective (all ranks of a TP×PP world): convert an HF folder to a torch_dist checkpoint."""
    from megatron.core import parallel_state as ps  # megatron-core loads only when converting

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
                max_shard_size: int | str = "5GB", iteration: int | None = None) -> dict[str, Any]:
    """Load any TP/PP checkpoint (the latest iteration, or `iteration`) at TP1/PP1
    (dist_checkpointing reshards), unpad the vocab and write safetensors (sharded with an index
    when large), config.json (its dtype: the checkpoint's) and tokenizer files."""
    meta = checkpoint.read_metadata(mcore_dir)
    hf = dict(meta["hf_config"])
    hf.pop("torch_dtype", None)  # transformers loads in this dtype: say what the tensors are
    hf["dtype"] = meta["dtype"]
    if hf_base is not None:
        base = json.loads((Path(hf_base) / "config.json").read_text())
        keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size")
        diff = [k for k in keys if base.get(k) != hf.get(k)]
        # Training may have grown the vocabulary (tokens the tokenizer patch added), never shrunk.
        if base.get("vocab_size", 0) > hf["vocab_size"]:
            diff.append("vocab_size")
        if diff:
            raise UserError(f"--hf-base {hf_base} is a different model ({', '.join(diff)} "
                                  "differ from the checkpoint's source config)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    arch = architecture_for(hf)
    dtype = DTYPES[meta["dtype"]]
    tied = bool(hf.get("tie_word_embeddings", False))
    with model_parallel(1, 1):
        model = build_model(hf, 1, 1, dtype)
        checkpoint.load(model, mcore_dir, iteration)
        tensors = hf_tensors_from_model(model, arch, geometry(hf, 1), tied)
    with staged_output(out) as tmp:  # a failed export leaves no folder that looks like a model
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, tmp / filename, metadata={"format": "pt"})
            follow_umask(tmp / filename)
        if split.is_sharded:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if hf_base is not None:
            for f in Path(hf_base).iterdir():
                if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template",
                                                        "generation_config", "vocab", "merges"))):
                    shutil.copyfile(f, tmp / f.name)
    return {"tensors": len(tensors), "shards": len(split.filename_to_tensors)}
