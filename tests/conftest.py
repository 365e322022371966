"""Shared test setup: Hugging Face libraries stay offline and out of the user's cache; small generated stories."""

import atexit
import os
import random
import shutil
import tempfile

# Before anything imports `datasets` or `huggingface_hub`: both read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="gptlit-test-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

import pytest  # noqa: E402

_NAMES = ["Lily", "Tom", "Mia", "Ben", "Zoë", "José", "Sam"]
_WORDS = [
    *["the", "a", "little", "big", "dog", "cat", "ball", "tree", "sun", "park", "happy", "sad", "ran", "jumped"],
    *["saw", "found", "wanted", "to", "play", "with", "and", "said", "mom", "friend", "day", "garden", "red"],
    *["blue", "“Yes!”", "“Look,”", "she’s", "it’s", "very", "fast", "slow", "home", "smiled", "café", "🙂"],
]


def make_stories(n: int, seed: int = 0) -> list[str]:
    """``n`` short, distinct stories: names, Unicode punctuation, an emoji, sometimes two paragraphs."""
    rng = random.Random(seed)
    stories = []
    for i in range(n):
        paragraphs = [
            " ".join([rng.choice(_NAMES), *rng.choices(_WORDS, k=rng.randint(5, 30))]) + "."
            for _ in range(rng.randint(1, 2))
        ]
        stories.append(f"Story {i}. " + "\n".join(paragraphs))
    return stories


@pytest.fixture
def stories() -> list[str]:
    return make_stories(300)
