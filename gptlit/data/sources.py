"""Where stories come from: a Hugging Face Hub id or local files, read as streams of cleaned story strings.

Supported sources:
    a hub id such as ``roneneldan/TinyStories`` or ``HuggingFaceFW/fineweb-edu`` (with ``config_name``
    ``sample-10BT``): the splits ``train_split`` and ``val_split`` of the configuration ``config_name``;
    a ``.txt`` file in the official TinyStories layout (stories separated by a line ``<|endoftext|>``);
    a ``.json``/``.jsonl`` file, or a ``.parquet`` file, with the stories in the field ``text_field``;
    a glob of such files, or a directory of them.
A directory laid out like a hub repository (``data/train-*.parquet``, ``data/validation-*.parquet``, or
``*-train.txt``/``*-valid.txt``, or a README.md whose front matter declares ``configs:``) is read as a hub id
is, with its own splits; every other local source has the one split ``train``. With ``val_split`` None, or
for a local source without the split ``val_split`` names, the validation stories are held out of the training
split by :func:`hold_out`. :class:`gptlit.data.options.DataOptions` holds these options, and those of the
tokenizer, checked once.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment

import numpy as np

from gptlit.data.options import DataOptions
from gptlit.errors import DataError

TXT_SEPARATOR = "<|endoftext|>"
BUILDERS = {".txt": None, ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> datasets builder
HUB_TIMEOUT_S = 1.5
_TRUE = {"1", "ON", "YES", "TRUE"}


Reader = Callable[[], Iterable[Any]]  # each call starts a fresh pass over raw texts


@dataclass
class StorySource:
    """A corpus as one or two re-readable streams of raw texts, opened on first use.

    Opening is deferred so that an up-to-date data directory needs neither the network nor ``datasets``:
    the fingerprint alone tells whether the source changed.

    Args:
        name: The source as the user gave it, for messages.
        fingerprint: What identifies the content (local files with sizes and mtimes, or the hub id); JSON-able.
        open_splits: Returns the training reader and the reader of the validation split (None when there is
            none to read: the validation stories are then held out of the training split).
        text_field: The field the texts come from, for messages.
    """

    name: str
    fingerprint: list[Any]
    open_splits: Callable[[], tuple[Reader, Reader | None]]
    text_field: str = "text"
    _splits: tuple[Reader, Reader | None] | None = field(default=None, init=False, repr=False)

    def splits(self) -> tuple[Reader, Reader | None]:
        if self._splits is None:
            self._splits = self.open_splits()
        return self._splits

    @property
    def has_val_split(self) -> bool:
        return self.splits()[1] is not None

    def stories(self, val_fraction: float, seed: int) -> Iterator[tuple[str, str]]:
        """``(split, story)`` pairs with split ``"train"`` or ``"val"``: stripped, blank stories dropped."""
        read_train, read_val = self.splits()
        if read_val is None:
            yield from hold_out(clean(read_train(), self.name, self.text_field), val_fraction, seed)
            return
        for split, read in (("train", read_train), ("val", read_val)):
            for text in clean(read(), self.name, self.text_field):
                yield split, text


def clean(texts: Iterable[Any], name: str, text_field: str = "text") -> Iterator[str]:
    """Strip surrounding whitespace and drop blank stories; Unicode is kept as it is.

    Mojibake such as ``â€™`` for ``’`` is left alone: no story in the 2 MiB TinyStories sample has any, and
    a repair table would also rewrite stories that legitimately contain those characters.
    """
    for text in texts:
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{name}: a '{text_field}' value is {type(text).__name__}, not a string")
        text = text.strip()
        if text:
            yield text


def hold_out(stories: Iterable[str], val_fraction: float, seed: int) -> Iterator[tuple[str, str]]:
    """Split one stream into ``("train", s)`` and ``("val", s)`` pairs in a single pass.

    Story i is held out when the i-th draw of ``np.random.default_rng(seed)`` falls below ``val_fraction``:
    the same split on every run, without counting the stories first. If no draw falls below it, the last story
    is held out, so the validation split is never empty. Order within each split is the corpus order.
    """
    rng = np.random.default_rng(seed)
    draws = np.empty(0)
    held_back: str | None = None  # the latest training story: it may yet have to be the only val story
    any_val = False
    for i, text in enumerate(stories):
        if i % 4096 == 0:
            draws = rng.random(4096)
        if draws[i % 4096] < val_fraction:
            any_val = True
            yield "val", text
            continue
        if held_back is not None:
            yield "train", held_back
        held_back = text
    if held_back is not None:
        yield ("train" if any_val else "val"), held_back


# Readers -------------------------------------------------------------------------------------------


def read_txt(path: Path) -> Iterator[str]:
    """Stories of a ``.txt`` in the official TinyStories layout, streamed line by line."""
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                # Cheap prefix test first: nearly every line is story text.
                if line.startswith(TXT_SEPARATOR) and line.strip() == TXT_SEPARATOR:
                    yield "".join(lines)
                    lines = []
                else:
                    lines.append(line)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    yield "".join(lines)  # the last story may have no separator after it


def read_records(dataset: Any, name: str, text_field: str = "text") -> Iterator[Any]:
    """The ``text_field`` of a ``datasets`` (streaming) dataset, fetched in batches (much faster than rows)."""
    for batch in dataset.iter(batch_size=1024):
        if text_field not in batch:
            raise DataError(
                f"{name}: records have no '{text_field}' field (fields: {', '.join(batch) or 'none'}); "
                "set --data.text_field to the one that holds the text"
            )
        yield from batch[text_field]


def read_file(path: Path, text_field: str = "text") -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(f"{path}: unsupported file type; use .txt, .json, .jsonl or .parquet")
    if suffix == ".txt":
        yield from read_txt(path)
        return
    import datasets

    try:
        dataset = datasets.load_dataset(BUILDERS[suffix], data_files=[str(path)], split="train", streaming=True)
        yield from read_records(dataset, str(path), text_field)
    except DataError:
        raise
    except Exception as err:  # datasets and pyarrow raise many types for a malformed file
        raise DataError(f"{path}: cannot read it as {suffix} ({type(err).__name__}: {err})") from err


def _files_source(name: str, splits: dict[str, list[Path]], options: DataOptions) -> StorySource:
    """Local files read by gptlit itself, ``splits`` by name (``train``, and ``validation`` when they have one)."""
    files = [path for paths in splits.values() for path in paths]
    if options.config_name is not None:
        raise DataError(
            f"{name}: --data.config_name applies to a hub data set or a directory whose README.md declares "
            "configs; leave it null for these files"
        )
    if options.text_field != "text" and all(p.suffix.lower() == ".txt" for p in files):
        raise DataError(f"{name}: .txt stories have no fields; --data.text_field applies to .json, .jsonl, .parquet")

    def reader(files: list[Path]) -> Reader:
        return lambda: (text for path in files for text in read_file(path, options.text_field))

    readers = {split: reader(paths) for split, paths in splits.items()}
    return StorySource(
        name, _fingerprint(files), lambda: pick_splits(name, readers, options, local=True), options.text_field
    )


def _fingerprint(files: list[Path]) -> list[Any]:
    return [[str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns] for p in files]


def pick_splits(
    name: str, splits: Mapping[str, Reader], options: DataOptions, local: bool
) -> tuple[Reader, Reader | None]:
    """The readers of ``options.train_split`` and ``options.val_split`` among a source's ``splits``.

    The validation reader is None, to hold stories out of the training split, when ``val_split`` is None, or
    when a ``local`` source lacks the default ``validation`` split (most local corpora have no splits). A hub
    data set without it is refused instead: holding out is then a choice the user makes.
    """
    train, val = options.train_split, options.val_split
    found = ", ".join(f"'{split}'" for split in splits)
    if train not in splits:
        raise DataError(f"{name}: no split '{train}' (splits: {found}); set --data.train_split to one of them")
    if val is None or (val not in splits and local and val == DataOptions.val_split):
        return splits[train], None
    if val not in splits:
        raise DataError(
            f"{name}: no split '{val}' (splits: {found}); set --data.val_split to one of them, or to null to "
            f"hold --data.val_fraction of '{train}' out"
        )
    return splits[train], splits[val]


def _load_splits(path: str, name: str, options: DataOptions, local: bool) -> tuple[Reader, Reader | None]:
    """A hub id or a local directory, read with ``datasets.load_dataset``: the same code path for both.

    Streaming: nothing is downloaded or loaded whole; each reader starts a fresh pass over its split.
    """
    import datasets

    try:
        splits = datasets.load_dataset(path, options.config_name, streaming=True)
    except ValueError as err:  # also datasets' answer to a configuration it does not know, or a missing one
        _check_config_name(path, name, options.config_name, err)
        raise

    def reader(split: str) -> Reader:
        return lambda: read_records(splits[split], f"{name} ({split})", options.text_field)

    return pick_splits(name, {split: reader(split) for split in splits}, options, local)


def _check_config_name(path: str, name: str, config_name: str | None, err: ValueError) -> None:
    """Raise a one-line DataError when ``err`` comes from a ``config_name`` that ``path`` does not have."""
    import datasets

    try:
        names = datasets.get_dataset_config_names(path)
    except Exception:  # the original error says more than this one would
        return
    if config_name in names or (config_name is None and ("default" in names or len(names) <= 1)):
        return  # not a configuration that is missing or unknown
    found = ", ".join(names)
    wanted = "needs a configuration" if config_name is None else f"has no configuration '{config_name}'"
    raise DataError(f"{name} {wanted} (configurations: {found}); set --data.config_name to one of them") from err


# Choosing a source -----------------------------------------------------------------------------------


def open_source(options: DataOptions) -> StorySource:
    """Resolve ``options.source`` (a path, a glob, a directory or a hub id) to a :class:`StorySource`."""
    source = options.source
    path = Path(source).expanduser()
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{source}: no files match this pattern")
        return _files_source(source, {"train": files}, options)
    if path.is_file():
        return _files_source(source, {"train": [path]}, options)
    if path.is_dir():
        return _directory_source(source, path, options)
    if path.suffix.lower() in BUILDERS or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise DataError(f"{source}: no such file or directory; check --data.source")
    return _hub_source(source, options)


def _directory_source(source: str, path: Path, options: DataOptions) -> StorySource:
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in BUILDERS
        and not any(s.startswith(".") for s in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: no .txt, .json, .jsonl or .parquet files in this directory")
    txt = [p for p in files if p.suffix.lower() == ".txt"]
    if not txt:

        def open_splits() -> tuple[Reader, Reader | None]:
            try:
                return _load_splits(str(path), source, options, local=True)
            except DataError:
                raise
            except Exception as err:
                raise DataError(f"{path}: datasets cannot read it ({type(err).__name__}: {err})") from err

        return StorySource(source, _fingerprint(files), open_splits, options.text_field)
    if len(txt) != len(files):
        raise DataError(f"{path}: mixes .txt with other formats; keep one format per directory")
    # datasets' "text" builder yields lines, not stories, so .txt files are read here, but split by the same
    # file-name conventions (TinyStories-train.txt / TinyStories-valid.txt) that load_dataset would use.
    from datasets.data_files import DataFilesDict, get_data_patterns

    resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    splits = {k: sorted(Path(f) for f in v if f.endswith(".txt")) for k, v in resolved.items()}
    if splits.get("train") and splits.get("validation"):
        return _files_source(source, {"train": splits["train"], "validation": splits["validation"]}, options)
    return _files_source(source, {"train": txt}, options)


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _unreachable(source: str, why: str) -> DataError:
    return DataError(
        f"{source} is not a local path, and {why}; download it elsewhere and point --data.source at a local "
        "copy, e.g. --data.source path/to/TinyStories-train.txt"
    )


def check_hub_reachable(source: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when the hub (``HF_ENDPOINT``, or the https proxy) cannot be reached.

    ``datasets`` itself retries for tens of seconds (minutes on a hanging network) before giving up. The
    connection is tried in a thread so that a hanging DNS lookup is cut off by the same timeout.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlsplit(endpoint)
    # The proxy requests would take: https_proxy (or HTTPS_PROXY), unless no_proxy exempts the host.
    proxies = getproxies_environment()
    proxy = None if proxy_bypass_environment(url.hostname or "", proxies) else proxies.get(url.scheme)
    target = urlsplit(proxy) if proxy else url
    port = target.port or (443 if target.scheme == "https" else 80)
    errors: list[BaseException] = []
    done = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
        except OSError as err:
            errors.append(err)
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    if not done.wait(timeout) or errors:
        why = f"{errors[0]}" if errors else f"no answer within {timeout:g} s"
        raise _unreachable(source, f"the Hugging Face Hub at {endpoint} cannot be reached ({why})")


def _hub_source(source: str, options: DataOptions) -> StorySource:
    def open_splits() -> tuple[Reader, Reader | None]:
        offline = _hub_offline()
        if not offline:
            check_hub_reachable(source)
        try:
            return _load_splits(source, source, options, local=False)
        except DataError:
            raise
        except Exception as err:
            if offline:
                raise _unreachable(source, "HF_HUB_OFFLINE is set and the datasets cache has no copy of it") from err
            raise DataError(
                f"{source}: cannot load it from the Hugging Face Hub ({type(err).__name__}: {err})"
            ) from err

    return StorySource(source, [source], open_splits, options.text_field)
