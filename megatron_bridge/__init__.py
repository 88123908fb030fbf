"""Everything that knows Megatron, free of Prefect: architecture tables, HF⇄Megatron conversion,
indexed datasets and the trainer run under torchrun (filled in by the conversion, data and
training issues)."""

import warnings

# megatron-core warns on import, once per module, that TE/Apex are missing: expected on CPU, where
# the local implementations are what we select.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed",
                        category=UserWarning)
