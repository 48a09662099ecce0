"""Exporting a trained model for use outside charlm: safetensors_format.py (the weights, with the config
and vocabulary in its metadata, and the way back to a charlm model), onnx_format.py (the single-step
model), onnx_check.py (that model run in onnxruntime against charlm), metadata.py (what both files
carry besides tensors) and extra.py (importing the optional libraries, or saying which extra to install).

May import torch, `charlm.models`, `charlm.data`, `charlm.inference` and `charlm.store.checkpoint`
(the model a checkpoint describes); never `charlm.report` or `charlm.cli`. The libraries of the
`export` extra (safetensors, onnx, onnxruntime, onnxscript) are imported inside the functions that
use them, so charlm runs without it.
"""
