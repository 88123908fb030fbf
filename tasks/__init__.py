"""Pipeline stages: one module each (a plain build function + its `Stage` record), the artifact
store, and the shared Prefect task wrapper. `STAGES` is the DAG in a topological order; `scores`
(tasks/scores.py) is not among them: the flow plans it over the evaluated checkpoints when
`evaluate.checkpoints` is not `last`."""

from tasks import convert, dataset, download, evaluate, export, patch_tokenizer, tokenize, train
from tasks.stage import Stage

STAGES: list[Stage] = [download.STAGE, patch_tokenizer.STAGE, convert.STAGE, dataset.STAGE,
                       tokenize.STAGE, train.STAGE, export.STAGE, evaluate.STAGE]
STAGE_NAMES = [s.name for s in STAGES]
BY_NAME = {s.name: s for s in STAGES}
