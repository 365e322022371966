"""Shared test setup: Hugging Face libraries stay offline and out of the user's cache; small generated stories."""

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

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


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with a corpus (stories.txt), where runs land in ./lightning_logs."""
    from helpers import write_corpus

    write_corpus(tmp_path / "stories.txt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding one short training run of a tiny model ("run", 40 steps), trained once per session."""
    from helpers import run_cli, write_config, write_corpus

    root = tmp_path_factory.mktemp("trained")
    write_corpus(root / "stories.txt")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_cli("fit", "--config", str(write_config(root, max_steps=40)))
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with ``stories.txt`` (300 stories, with padding and blanks) and ``data/`` prepared from it
    (vocabulary 400, 5% held out), once per session; copy it before changing it."""
    from helpers import make_dm, write_stories

    root = tmp_path_factory.mktemp("prepared")
    corpus = write_stories(root / "stories.txt", make_stories(300), "txt")
    make_dm(root / "data", corpus).prepare_data()
    return root
