"""Training: one run from start to end (its run dir, lock and metrics log), the loop, the
optimiser and schedule, recovery from non-finite steps, checkpoints (their file format, their
contents and the resume check), data parallelism under torchrun, devices and stop signals.

May import `charlm.models`, `charlm.data`, `charlm.inference` (the validation loss and the
preview samples are the same code `eval` and `sample` run), `charlm.config` and the shared
helpers; never `charlm.report` (the run is handed its progress display) nor `charlm.cli`.
"""
