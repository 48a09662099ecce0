"""Training: one run from start to end, the loop, the optimiser and schedule, recovery from
non-finite steps, what a training checkpoint holds, data parallelism under torchrun, devices and
stop signals. The files themselves (run dir, checkpoint format, metrics.jsonl) are `charlm.store`'s.

May import `charlm.models`, `charlm.data`, `charlm.store`, `charlm.inference` (the validation loss and the
preview samples are the same code `eval` and `sample` run), `charlm.config` and the shared
helpers; never `charlm.report` (the run is handed its progress display) nor `charlm.cli`.
"""
