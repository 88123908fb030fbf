"""Stage `export`: the trained Megatron checkpoint as a Hugging Face model folder people can use.

safetensors + `config.json` (the base model's, with its vocabulary size) from `megatron_bridge`;
the patched tokenizer; `generation_config.json` whose EOS is the chat template's end-of-turn token
and which samples by default (`do_sample`, temperature, top_p); a model card with lineage. The
folder verifies itself: transformers loads it and its logits must match the checkpoint's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from settings.errors import UserError
from settings.models import ExportSettings
from tasks import model_card
from tasks.artifacts import MANIFEST, ArtifactStore, Manifest
from tasks.convert import check_verification
from tasks.stage import BuildContext, Stage

# Not model files: kept in the artifact, never uploaded.
NOT_UPLOADED = (MANIFEST, "verification.json", "logs/*", "model_card_info.json")


def checkpoint_for(train: Manifest, iteration: int | None,
                   store: ArtifactStore) -> tuple[Path, int]:
    """The checkpoint folder holding `iteration` (the final one in the artifact, earlier ones in
    the training run's scratch folder while `train.keep_last` keeps them, or
    `evaluate.checkpoints` chose them)."""
    from megatron_bridge import checkpoint

    final = int(checkpoint.read_tracker(train.dir))
    if iteration is None or iteration == final:
        return train.dir, final
    scratch = store.scratch("train", train.meta.get("lineage", train.key)) / "checkpoints"
    have = sorted({final, *checkpoint.available_iterations(scratch)})
    if iteration not in have or not checkpoint.iteration_dir(scratch, iteration).is_dir():
        raise UserError(f"export.iteration {iteration}: no checkpoint of that iteration (kept: "
                        f"{', '.join(map(str, have))}); choose one of them, or null for the final "
                        "one (raise train.keep_last to keep more)")
    return scratch, iteration


def generation_config(base: Path, tokenizer_dir: Path, settings: ExportSettings) -> dict[str, Any]:
    """The base model's generation config with EOS = the template's end-of-turn token (plus the
    tokenizer's EOS if different) and sampling on."""
    from megatron_bridge.data.chat import ChatMasker

    path = base / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    masker = ChatMasker(tokenizer_dir)
    end = masker.end_of_turn_id()
    eos = [end] + ([masker.eos_id] if masker.eos_id not in (None, end) else [])
    config.update(eos_token_id=eos[0] if len(eos) == 1 else eos, do_sample=True,
                  temperature=settings.temperature, top_p=settings.top_p)
    config.setdefault("pad_token_id", masker.pad_id if masker.pad_id is not None else eos[0])
    config.pop("transformers_version", None)
    return config


def build(ctx: BuildContext) -> None:
    from megatron_bridge.launch import run_bridge

    s: ExportSettings = ctx.settings
    train, tokenizer, base = (ctx.upstream[n].dir for n in ("train", "patch_tokenizer", "download"))
    wanted = ctx.iteration if ctx.iteration is not None else s.iteration
    source, iteration = checkpoint_for(ctx.upstream["train"], wanted, ctx.store)
    timeout = s.timeout_minutes * 60
    pick = ["--iteration", str(iteration)]
    ctx.log.info("export: iteration %d of %s -> HF folder", iteration, source)
    run_bridge(["mcore2hf", "--mcore", str(source), "--out", str(ctx.out), "--hf-base",
                str(base), "--max-shard-size", s.max_shard_size, *pick], None, None, timeout)
    for f in tokenizer.iterdir():  # the patched tokenizer replaces the base's
        if f.is_file() and f.name != MANIFEST:
            shutil.copyfile(f, ctx.out / f.name)
    (ctx.out / "generation_config.json").write_text(
        json.dumps(generation_config(base, ctx.out, s), indent=2) + "\n")
    config = json.loads((ctx.out / "config.json").read_text())
    base_vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    tokens = _tokenizer_size(ctx.out)
    if config["vocab_size"] != base_vocab:
        # Only tokens the patch added (ChatML's) may have grown the embedding, to just hold them.
        if config["vocab_size"] < base_vocab or config["vocab_size"] != tokens:
            raise UserError(f"vocab_size {config['vocab_size']} differs from the base model's "
                            f"{base_vocab} and from the tokenizer's {tokens} tokens")
        ctx.log.info("export: vocab_size %d (the base model's %d grown for the tokens the "
                     "tokenizer patch added)", config["vocab_size"], base_vocab)
    info = model_card.lineage(ctx.upstream, iteration)
    (ctx.out / "model_card_info.json").write_text(json.dumps({**info, "iteration": iteration},
                                                             indent=2))
    (ctx.out / "README.md").write_text(model_card.render(info, iteration))
    ctx.meta.update(iteration=iteration, vocab_size=config["vocab_size"], dtype=config["dtype"],
                    lineage=info["run"])
    if s.verify:
        logs = ctx.out / "logs"
        logs.mkdir()
        run_bridge(["verify", "--hf", str(ctx.out), "--mcore", str(source), *pick, "--json",
                    str(ctx.out / "verification.json")], (1, 1), logs / "verify.log", timeout)
        check_verification(ctx, s.max_abs_diff, s.min_top1_agreement,
                           "the exported folder does not reproduce the checkpoint's logits")


def _tokenizer_size(folder: Path) -> int:
    """Token ids in the tokenizer (base vocabulary and added tokens)."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = tj.get("model", {}).get("vocab", {})
    ids = [*(vocab.values() if isinstance(vocab, dict) else []),
           *(t["id"] for t in tj.get("added_tokens", []))]
    return max(ids, default=-1) + 1


def report(manifest: Manifest) -> list[dict]:
    path = manifest.dir / "verification.json"
    return json.loads(path.read_text())["prompts"] if path.is_file() else []


def markdown(manifest: Manifest) -> str:
    m = manifest.meta
    check = (f"; transformers reproduces the checkpoint's logits to {m['max_abs_diff']:.2g} "
             f"(top-1 agreement {m['top1_agreement']:.3f})" if "max_abs_diff" in m else "")
    return (f"### Export\n\nIteration {m['iteration']} as a Hugging Face folder ({m['dtype']}, "
            f"vocabulary {m['vocab_size']}){check}.\n\n`{manifest.dir}` — load it with "
            "`AutoModelForCausalLM.from_pretrained(...)`; the model card is its `README.md`.")


def verify_folder(manifest: Manifest) -> None:
    """The folder, where it was published, is what users load: transformers reads its config,
    generation config and tokenizer, and every weight file the index names is there."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder = manifest.dir
    AutoConfig.from_pretrained(folder)
    GenerationConfig.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    shards = (set(json.loads(index.read_text())["weight_map"].values()) if index.is_file()
              else {"model.safetensors"})
    if missing := sorted(f for f in shards if not (folder / f).is_file()):
        raise RuntimeError(f"weight file {missing[0]} is missing")


def gpus(settings: ExportSettings) -> int:
    """The conversion and the verification each load the checkpoint on this host's first GPU."""
    import torch

    return 1 if torch.cuda.is_available() else 0


STAGE = Stage(
    name="export", version="2", settings=lambda s: s.export, build=build, verify=verify_folder,
    upstream=("train", "patch_tokenizer", "download", "dataset"), report=report, markdown=markdown,
    gpus=gpus,
    # Keyed by the training run and the iteration: the same checkpoint of a longer run (or a
    # run with another checkpoint cadence) is the same export.
    checkpoint_of="train",
    description="Hugging Face model folder: safetensors, patched tokenizer, generation config, card",
)
