"""Decoding: picking tokens (sampling), the plain loop over the KV cache (decoding), drafted decoding on top of it
(draft), and the entry points that choose between them (``gptlit.generation.generate.generate``)."""

from gptlit.faces import lazy_names

__getattr__, __dir__ = lazy_names(
    __name__,
    {
        "NgramTable": "gptlit.generation.draft",
        "SamplingOptions": "gptlit.generation.decoding",
    },
)
