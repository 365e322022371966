"""The GPT in plain PyTorch: its config, rotary embeddings, the chunked loss, the model itself."""

from gptlit.faces import lazy_names

__getattr__, __dir__ = lazy_names(
    __name__,
    {"GPTConfig": "gptlit.model.config", "GPT": "gptlit.model.gpt", "Block": "gptlit.model.gpt"},
)
