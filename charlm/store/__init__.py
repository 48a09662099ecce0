"""What a run leaves on disk and how it is read back: the run folder (its file names, lock and
config.yaml: rundir.py), checkpoint files (format, atomic writing, safe reading, the model a
checkpoint describes: checkpoint.py) and metrics.jsonl (writer, reader, the summary `charlm runs`
shows: metrics.py).

Below training, inference, serving, export, report and tune, so that none of them imports
training to read a file. May import `charlm.models` (to rebuild a checkpoint's model), `charlm.data`
(its vocabulary), `charlm.config` and the shared helpers; rundir.py and metrics.py import no torch.
"""
