"""To transformers: the architecture that is exactly the model (architectures), and the export command."""

from gptlit.faces import lazy_names

__getattr__, __dir__ = lazy_names(__name__, {"export": "gptlit.export.command"})
