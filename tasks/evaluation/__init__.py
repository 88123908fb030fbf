"""lighteval, as open-r1 runs it: the offline task set shipped in `examples/eval`, the runner
(in-process function + `python -m tasks.evaluation` for the stage's subprocess), and the
hybrid-reasoning metrics computed from lighteval's per-sample details."""
