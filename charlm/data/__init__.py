"""The data: where text comes from (a file, a folder, a glob, a built-in corpus, a download),
how it is decoded and normalised, the vocabulary, the encoded-corpus cache and the TBPTT
batches cut from it.

May import torch, `charlm.config`, `charlm.errors`, `charlm.cache` and `charlm.atomic`; never
`charlm.models` or anything above (training, inference, report, cli).
"""
