"""Everything that knows Megatron, free of Prefect: architecture tables, HF⇄Megatron conversion,
indexed datasets and the trainer run under torchrun (filled in by the conversion, data and
training issues)."""
