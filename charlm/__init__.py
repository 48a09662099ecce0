"""charlm: character-level RNN/LSTM language models written from scratch in PyTorch."""

__version__ = "0.1.0"
