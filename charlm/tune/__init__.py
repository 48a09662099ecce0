"""Hyperparameter sweeps (`charlm tune`): the search space file (space.py), one trial as a
`charlm train` subprocess watched through its metrics.jsonl (trial.py) and tied to its worker so
that it never outlives it (tether.py), the Optuna study (study.py) and the loop that shares it
between workers (worker.py), the heartbeat that finds the trials of dead workers (heartbeat.py), what the
sweep keeps out of its messages and its database (credentials.py), and the sweep's results:
best.yaml, trials.csv (results.py).

May import `charlm.config`, the shared helpers, `charlm.store`'s torch-free run-dir and metrics
modules and the training package's signal module; optuna only inside functions (it is the `tune`
extra). Never imports torch: each trial trains in a process of its own (tether.py runs `charlm train` there).
"""
