"""Corpus to token files: read stories, train the tokenizer, write ``train.bin``, ``val.bin`` and ``meta.json``.

A prepared data directory holds

    tokenizer.json                      the byte-level BPE tokenizer (absent when ``tokenizer_path`` names one)
    train.bin, val.bin                  every story as ``<bos> story <eos>``, concatenated: a raw array of
                                        uint16 ids (uint32 above 65,535), readable with ``np.memmap``
    train_offsets.npy, val_offsets.npy  int64 start of each story in its ``.bin``
    meta.json                           written last: describes the files above and the settings behind them

Every file is written under a temporary name and renamed into place; ``meta.json`` is removed before the first
rename and written after the last, so a run killed at any point leaves the previous complete set or no set.
One process prepares a directory at a time (``.lock``, :mod:`gptlit.locks`): another one waits, then finds the
set prepared, or prepares what its own settings still need.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from gptlit.data.options import DataOptions
from gptlit.data.sources import StorySource, open_source
from gptlit.data.store import (
    CHECKSUM_CHUNK_BYTES,
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    TOKENIZER_FILE,
    ChunkChecksums,
    bin_path,
    check_files,
    offsets_path,
    read_meta,
    redo_hint,
    token_dtype,
)
from gptlit.data.tokenizer import Tokenizer, train_tokenizer
from gptlit.errors import DataError
from gptlit.locks import lock_directory

TMP_SUFFIX = ".tmp"
# Stories per encode_batch call: enough work for the Rust thread pool, small enough to keep memory flat.
ENCODE_BATCH_STORIES = 1024


# Writing -----------------------------------------------------------------------------------------


def _progress(description: str) -> Any:
    """A counter bar for a stream of unknown length; silent when stderr is not a terminal (CI logs, tests)."""
    from tqdm.auto import tqdm  # a dependency of datasets

    return tqdm(desc=description, unit=" stories", disable=None, file=sys.stderr)


class _SplitWriter:
    """Streams one split's ids to ``{split}.bin.tmp``, keeping only per-story offsets in memory (8 bytes each)."""

    def __init__(self, data_dir: Path, split: str, dtype: np.dtype) -> None:
        self.data_dir, self.split, self.dtype = data_dir, split, dtype
        self.file = open(bin_path(data_dir, split).with_suffix(".bin" + TMP_SUFFIX), "wb")  # noqa: SIM115
        self.tokens = self.stories = self.text_bytes = 0
        self.offsets: list[np.ndarray] = []
        self.checksums = ChunkChecksums(CHECKSUM_CHUNK_BYTES)

    def write(self, texts: list[str], ids: list[list[int]]) -> None:
        """Append the encoded ``texts`` (``ids``: one ``<bos> ... <eos>`` list per text)."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        # A Python int that does not fit the dtype raises OverflowError here: never a silent wrap-around.
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        data = flat.tobytes()
        self.file.write(data)
        self.checksums.update(data)
        self.offsets.append(self.tokens + np.cumsum(lengths) - lengths)
        self.tokens += len(flat)
        self.stories += len(texts)
        self.text_bytes += sum(len(t.encode("utf-8")) for t in texts)

    def close(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        offsets = np.concatenate(self.offsets) if self.offsets else np.zeros(0, dtype=np.int64)
        with open(offsets_path(self.data_dir, self.split).with_suffix(".npy" + TMP_SUFFIX), "wb") as f:
            np.save(f, offsets)
        counts = {"tokens": self.tokens, "stories": self.stories, "text_bytes": self.text_bytes}
        return {**counts, "crc32": self.checksums.finish()}

    def abandon(self) -> None:
        """Close without syncing or writing offsets: the files are temporaries about to be removed."""
        with contextlib.suppress(OSError):  # a full disk fails this flush too: report the first error, not this
            self.file.close()


def _batches(pairs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Group ``(split, story)`` pairs into per-split batches of ``ENCODE_BATCH_STORIES`` (the last ones shorter)."""
    batches: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split, text in pairs:
        batches[split].append(text)
        if len(batches[split]) == ENCODE_BATCH_STORIES:
            yield split, batches[split]
            batches[split] = []
    yield from ((split, batch) for split, batch in batches.items() if batch)


def write_bins(
    pairs: Iterable[tuple[str, str]], tokenizer: Tokenizer, data_dir: Path, dtype: np.dtype
) -> dict[str, dict[str, Any]]:
    """Encode ``(split, story)`` pairs in batches into ``{split}.bin.tmp`` and ``{split}_offsets.npy.tmp``.

    Returns per split: ``tokens`` (all ids, ``<bos>``/``<eos>`` included), ``stories``, ``text_bytes``
    (UTF-8 bytes of the stripped stories, separators excluded) and ``crc32`` (the checksum of each
    ``CHECKSUM_CHUNK_BYTES`` of the ``.bin``, computed as its bytes are written).
    """
    writers = {split: _SplitWriter(data_dir, split, dtype) for split in SPLITS}
    try:
        # While a background thread encodes one batch (the Rust encoder releases the GIL), this thread reads
        # the next stories and writes the previous batch, so that reading, encoding and writing overlap.
        with ThreadPoolExecutor(max_workers=1) as encoder, _progress("encoding stories") as bar:

            def finish(split: str, texts: list[str], encoding: Future) -> None:
                writers[split].write(texts, encoding.result())
                bar.update(len(texts))

            in_flight: tuple[str, list[str], Future] | None = None
            for split, texts in _batches(pairs):
                submitted = split, texts, encoder.submit(tokenizer.encode_batch, texts, bos=True, eos=True)
                if in_flight is not None:
                    finish(*in_flight)
                in_flight = submitted
            if in_flight is not None:
                finish(*in_flight)
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        raise
    return {split: writer.close() for split, writer in writers.items()}


def _rename_into_place(data_dir: Path, names: Iterable[str]) -> None:
    for name in names:
        os.replace(data_dir / (name + TMP_SUFFIX), data_dir / name)


def _remove_temporaries(data_dir: Path) -> None:
    for path in data_dir.glob("*" + TMP_SUFFIX):
        path.unlink()


# The whole preparation -----------------------------------------------------------------------------


def _previous_set(data_dir: Path) -> dict[str, Any] | None:
    """``meta.json`` of the complete set in ``data_dir``; None when there is none to reuse.

    No ``meta.json`` means no set, or a preparation killed before its commit: prepare afresh. A ``meta.json``
    whose files disagree with it (truncated, missing) or of another format version is never left by a kill;
    it is refused in words rather than overwritten, since another gptlit version or a copy may still need it.
    """
    if not (data_dir / META_FILE).is_file():
        return None
    meta = read_meta(data_dir)
    try:
        check_files(data_dir, meta)
        if not isinstance(meta["settings"], dict):
            raise TypeError("settings is not a mapping")
    except (KeyError, TypeError) as err:
        raise DataError(f"{data_dir / META_FILE} is malformed ({err}); {redo_hint(data_dir)}") from err
    return meta


def _unwritable(data_dir: Path, err: BaseException) -> DataError:
    why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    filename = err.filename if isinstance(err, OSError) else None
    where = f" ({filename})" if filename and Path(filename) != data_dir else ""
    return DataError(
        f"cannot write {data_dir}: {why}{where}; free some disk space or choose a writable --data.data_dir"
    )


def _say(message: str) -> None:
    print(f"gptlit data: {message}", file=sys.stderr, flush=True)


def _choose_tokenizer(
    data_dir: Path, options: DataOptions, old_meta: dict[str, Any] | None
) -> tuple[Path, dict[str, Any] | None, str | None]:
    """Decide which tokenizer to use: ``(file, trained_with, why it must be (re)trained or None to reuse it)``.

    ``trained_with`` records the settings gptlit trained ``data_dir/tokenizer.json`` with (None for a tokenizer
    the user supplied), so that a changed ``vocab_size`` retrains it instead of silently reusing the old one.
    """
    tokenizer_path, vocab_size = options.tokenizer_path, options.vocab_size
    if tokenizer_path is not None:
        return Path(tokenizer_path), None, None
    path = data_dir / TOKENIZER_FILE
    wanted = None  # the settings to train with, when it is to be trained
    if vocab_size is not None:
        wanted = {"vocab_size": vocab_size, "tokenizer_train_stories": options.tokenizer_train_stories}
    if not path.is_file():
        if wanted is None:
            raise DataError(f"vocab_size is None but {path} does not exist: give a vocab_size or a tokenizer_path")
        return path, wanted, f"training a tokenizer with {vocab_size} tokens"
    settings = (old_meta or {}).get("settings", {})
    tokenizer = Tokenizer.from_file(path)
    vouched = settings.get("tokenizer_sha256") == tokenizer.sha256
    old_trained = settings.get("tokenizer_trained_with") if vouched else None
    if old_trained is not None and wanted is not None and old_trained != wanted:
        return path, wanted, f"tokenizer settings changed from {old_trained} to {wanted}: retraining it"
    if old_trained is None and vocab_size is not None and tokenizer.vocab_size != vocab_size:
        # Never reused as it is, nor called up to date: it may be gptlit's own, of another size.
        raise DataError(
            f"{path} has {tokenizer.vocab_size} tokens, not vocab_size={vocab_size}, and no {META_FILE} records "
            f"gptlit training it: delete it to train one of {vocab_size}, or set vocab_size to null to keep it"
        )
    if not vouched:
        _say(f"using the tokenizer already in {path}; delete it to train a new one")
    # Ours with the same settings, or a tokenizer the user put there: reuse it as it is.
    return path, old_trained, None


def _changed_settings(old_meta: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    """Which of ``settings`` differ from the earlier preparation's ('' when none do)."""
    if old_meta is None:
        return "everything"
    old = old_meta["settings"]
    keys = [*settings, *(k for k in old if k not in settings)]  # a reading option back at its default is absent
    # A source with its own validation split was recorded with hold_out None: val_fraction and seed don't matter.
    changed = [k for k in keys if old.get(k) != settings.get(k) and not (k == "hold_out" and old.get(k) is None)]
    return ", ".join(changed)


@dataclass
class Plan:
    """What a preparation of ``data_dir`` will do, decided before anything is written."""

    options: DataOptions
    stories: StorySource
    data_dir: Path
    tokenizer_file: Path
    tokenizer: Tokenizer | None  # None: train one, on the first tokenizer_train_stories training stories
    settings: dict[str, Any]  # recorded in meta.json; a later preparation compares its own with them
    reason: str  # why it prepares, for the user


def prepare_dataset(options: DataOptions, data_dir: str | Path) -> dict[str, Any]:
    """Turn ``options.source`` into a prepared ``data_dir`` (see the module docstring); returns its meta.json.

    Does nothing when ``data_dir`` already holds a complete set prepared with the same settings.
    """
    data_dir = Path(data_dir)
    plan, meta = plan_preparation(options, data_dir)  # a prepared directory is read, never locked: it may be read-only
    if plan is not None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)  # kept, like the files, when preparing fails
            lock = lock_directory(data_dir, True, lambda holder: _say(f"waiting for {holder} to let go of {data_dir}"))
        except OSError as err:
            raise _unwritable(data_dir, err) from err
        with lock:
            plan, meta = plan_preparation(options, data_dir)  # again: another process may have prepared it meanwhile
            if plan is not None:
                return carry_out(plan)
    _say(f"{data_dir} is up to date (same source, tokenizer and split settings); nothing to do")
    return meta


def plan_preparation(options: DataOptions, data_dir: Path) -> tuple[Plan | None, dict[str, Any]]:
    """Decide what to do: ``(None, the existing meta)`` when ``data_dir`` is up to date, else ``(plan, {})``."""
    stories: StorySource = open_source(options)  # resolved, not yet opened: no network, no datasets
    old_meta = _previous_set(data_dir)
    tokenizer_file, trained_with, train_reason = _choose_tokenizer(data_dir, options, old_meta)
    tokenizer = None if train_reason else Tokenizer.from_file(tokenizer_file)
    settings: dict[str, Any] = {
        "source": options.source,
        "source_fingerprint": stories.fingerprint,
        **options.reading(),  # none at their defaults: meta.json as an earlier gptlit wrote it
        "hold_out": {"val_fraction": options.val_fraction, "seed": options.seed},
        "tokenizer_sha256": tokenizer.sha256 if tokenizer else None,
        "tokenizer_trained_with": trained_with,
    }
    changed = _changed_settings(old_meta, settings)
    if old_meta is not None and tokenizer is not None and not changed:
        return None, old_meta
    # Opens the source: fails fast here, before anything is written, when the hub cannot be reached.
    if stories.has_val_split:
        settings["hold_out"] = None  # only a source without a validation split is split by val_fraction and seed
    reason = train_reason or ("no complete earlier preparation" if old_meta is None else f"{changed} changed")
    plan = Plan(
        options=options,
        stories=stories,
        data_dir=data_dir,
        tokenizer_file=tokenizer_file,
        tokenizer=tokenizer,
        settings=settings,
        reason=reason,
    )
    return plan, {}


def carry_out(plan: Plan) -> dict[str, Any]:
    """Write the set ``plan`` describes into its directory, atomically (see the module docstring); its meta."""
    data_dir, options = plan.data_dir, plan.options
    _say(f"preparing {data_dir} from {options.source} ({plan.reason})")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(data_dir, err) from err
    try:
        tokenizer = plan.tokenizer or _train_tokenizer(plan)
        if options.vocab_size is not None and tokenizer.vocab_size > options.vocab_size:
            raise DataError(
                f"{plan.tokenizer_file} has {tokenizer.vocab_size} tokens, more than vocab_size={options.vocab_size}: "
                "raise vocab_size or use another tokenizer"
            )
        dtype = token_dtype(tokenizer.vocab_size)
        counts = write_bins(plan.stories.stories(options.val_fraction, options.seed), tokenizer, data_dir, dtype)
        for split in SPLITS:
            if counts[split]["stories"] == 0:
                raise DataError(
                    f"{options.source}: no {split} stories (the source is empty after dropping blank stories); "
                    "point --data.source at a corpus of at least two stories"
                )
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "crc32_chunk_bytes": CHECKSUM_CHUNK_BYTES,
            "tokenizer_file": str(plan.tokenizer_file),
            "settings": {**plan.settings, "tokenizer_sha256": tokenizer.sha256},
            "splits": counts,
        }
        _commit(data_dir, meta, with_tokenizer=plan.tokenizer is None)
    except OSError as err:
        if isinstance(err.filename, str) and data_dir not in Path(err.filename).parents:
            raise  # not one of data_dir's files: reading the source failed
        raise _unwritable(data_dir, err) from err
    finally:
        _remove_temporaries(data_dir)  # this run's, or leftovers of a killed one (overwritten, never read)
    splits = ", ".join(f"{s} {c['tokens']:,} tokens in {c['stories']:,} stories" for s, c in counts.items())
    _say(f"wrote {data_dir}: {splits}")
    return meta


def _train_tokenizer(plan: Plan) -> Tokenizer:
    """Train the plan's tokenizer on its first training stories and write it, as a temporary, into the set."""
    options = plan.options
    n = "all" if options.tokenizer_train_stories is None else f"the first {options.tokenizer_train_stories:,}"
    _say(f"training a {options.vocab_size}-token tokenizer on {n} training stories")
    texts = (text for split, text in plan.stories.stories(options.val_fraction, options.seed) if split == "train")
    assert options.vocab_size is not None  # _choose_tokenizer trains one only for a given size
    tokenizer = train_tokenizer(islice(texts, options.tokenizer_train_stories), options.vocab_size)
    try:
        tokenizer.save(plan.data_dir / (TOKENIZER_FILE + TMP_SUFFIX))
    except Exception as err:  # tokenizers reports a failed write as a bare Exception
        raise _unwritable(plan.data_dir, err) from err
    return tokenizer


def _commit(data_dir: Path, meta: dict[str, Any], with_tokenizer: bool) -> None:
    """Put the written temporaries in place, ``meta.json`` last.

    Without meta.json nothing is accepted, so it is removed first: a kill at any point leaves the previous
    complete set (before the removal), the new one (after the last rename), or none.
    """
    (data_dir / (META_FILE + TMP_SUFFIX)).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    with contextlib.suppress(FileNotFoundError):
        (data_dir / META_FILE).unlink()
    names = [f"{s}.bin" for s in SPLITS] + [offsets_path(data_dir, s).name for s in SPLITS]
    if with_tokenizer:
        names.append(TOKENIZER_FILE)
    _rename_into_place(data_dir, [*names, META_FILE])
