"""Using a trained model: sampling (decoding settings, prompt handling, the state-caching
generation loop) and evaluation (loss, bits per character and perplexity over a text, scored
with carried state in parallel streams).

May import torch, `charlm.data` and `charlm.errors`; it is handed a model and never imports
`charlm.models` internals, `charlm.training`, `charlm.report` or `charlm.cli`.
"""
