"""Data: sources (hub or local), the tokenizer, preparation into token files, the token store, the DataModule."""

from gptlit.faces import lazy_names

__getattr__, __dir__ = lazy_names(
    __name__,
    {
        "TextDataModule": "gptlit.data.datamodule",
        "TinyStoriesDataModule": "gptlit.data.datamodule",
        "DataOptions": "gptlit.data.options",
        "Tokenizer": "gptlit.data.tokenizer",
    },
)
