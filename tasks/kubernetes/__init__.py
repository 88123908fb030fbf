"""`train.launcher: kubernetes`: the training job as a Kubeflow PyTorchJob, created and watched
from the `train` task with `kubectl` (its current context selects the cluster).

The job has one pod per node (`Master` + `nnodes - 1` `Worker`s); each runs the same torchrun
agent as the other launchers (`tasks.train_launch.agent_command`), meeting at a c10d rendezvous on
`$(MASTER_ADDR):$(MASTER_PORT)`, which the training operator sets in every replica. The workdir is
a shared volume (`train.kubernetes.volume_claim`) mounted in the pods at the same absolute path as
on the machine running the flow, so the job JSON, the checkpoints and `metrics.jsonl` are the same
files on both sides.

- `manifest`: the PyTorchJob (`rsft kubernetes manifest` prints it without a cluster);
- `client`: kubectl, whose JSON is all this reads (no Kubernetes Python client at run time);
- `watch`: the job's and pods' status, the master's log followed into the shared agent watcher
  (`tasks/agent_watch.py`), the poll loop;
- `launch`: `run_pytorchjob`, what the train stage calls.
"""
