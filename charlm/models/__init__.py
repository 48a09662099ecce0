"""The models: the cell equations, the layers that run them over time through three
interchangeable backends (native step loops with a hand-written backward, torch's fused
kernels, the readable reference), the C++ loops in `csrc/`, and `CharLM`, built from the config's model section.
`registry.py` lists the cell types (one entry each) as plain data: it imports no torch, so the
config schema reads `model.type`'s choices from it.

May import torch, `charlm.config` (the schema), `charlm.errors`, `charlm.cache` and
`charlm.atomic`; never `charlm.data` or anything above (training, inference, report, cli).
"""
