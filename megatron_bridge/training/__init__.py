"""The SFT trainer on megatron-core, run under torchrun: `python -m megatron_bridge.training JOB.json`.

- `job.py`      the job description (JSON written by the `train` stage) and its checks
- `schedule.py` learning rate: linear warm-up, then cosine / linear / constant to the minimum
- `batches.py`  seeded, resumable data order; packed rows → tensors, masks, THD boundaries
- `step.py`     the per-token loss and one optimizer step — CPU (torch AdamW, gloo all-reduce,
                block-diagonal masks) and GPU (Megatron DDP + optimizer + schedules, THD packing)
- `state.py`    checkpoints: model (torch_dist), optimizer, progress; atomic, keep-last-k
- `trainer.py`  the loop: build, load or resume, step, log metrics, save
"""
