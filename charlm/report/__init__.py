"""What people look at: the live training display, loss plots, the table of runs and the
viz page (a model's surprisal and gate activations over a text, as self-contained HTML).

May import `charlm.store` (the files a run writes),
`charlm.data`, `charlm.config` and the shared helpers; plots and the runs table import no torch.
"""
