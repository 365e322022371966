"""gptlit: train a small GPT from scratch on TinyStories with PyTorch Lightning."""

from gptlit.config import GPTConfig

__all__ = ["GPTConfig"]
__version__ = "0.1.0"
