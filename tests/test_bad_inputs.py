"""Bad inputs, one row each: the real command line fails with one line that names the problem and what to do.

Every row runs ``python -m gptlit ...`` in a fresh copy of a small workspace (a corpus, a config, prepared data
and a trained run) and checks the exit code, that stderr holds no Python traceback, that its last line is
``gptlit: error: ...`` naming the problem, and that no file that was there before has changed. To add a case,
add a row to CASES. The rows run two at a time, each forked from a process that has imported gptlit's command
line (tests/forked_cli.py): a process of its own would spend ~4 s importing Lightning.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

import pytest
import yaml
from bad_input_cases import (
    Case,
    edit_config,
    last_good_checkpoint_kept,
    nothing_started,
    payload_never_ran,
    point_at_dev_full,
    put_id_beyond_vocab,
    remove_runs,
    set_meta_version,
    swap_valid_ids,
    truncate_train_bin,
    wide_ids_survive,
    write_blocking_file,
    write_config_of_no_run,
    write_empty_corpus,
    write_fineweb_repository,
    write_nan_checkpoint,
    write_other_tokenizer,
    write_plain_ckpt,
    write_story_records,
    write_unsafe_checkpoint,
    write_wide_vocabulary,
)
from forked_cli import ForkedCli
from helpers import write_config, write_corpus

from gptlit.cli.main import cli_main

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
LONG_PROMPT = "Lily saw the big red ball in the park and ran to it. " * 20  # ~300 tokens; block_size is 32
POISON = '{"class_path": "probes.PoisonAt", "init_args": {"step": 9}}'


CASES = [
    Case("missing config file", "fit --config missing.yaml", "missing.yaml", code=2),
    Case(
        "unknown key in YAML",
        "fit --config bad.yaml",
        "model.config.embed_dimm",
        2,
        edit_config("embed_dim:", "embed_dimm:"),
    ),
    Case(
        "wrongly typed YAML value",
        "fit --config bad.yaml",
        "model.config.n_layers",
        2,
        edit_config("n_layers: 2", "n_layers: x"),
    ),
    Case("unknown command", "fitt", "unknown command 'fitt'", code=2),
    Case("missing data source", "prepare --config run.yaml --data.source nowhere.txt", "nowhere.txt: no such file"),
    Case(
        "empty corpus",
        "prepare --config run.yaml --data.source empty.txt",
        "empty.txt: no train stories",
        setup=write_empty_corpus,
    ),
    Case(".bin truncated to an odd size", "fit --ckpt_path last", "train.bin is truncated", setup=truncate_train_bin),
    Case(
        "token id >= vocab in a .bin", "fit --ckpt_path last", "val.bin holds token id 400", setup=put_id_beyond_vocab
    ),
    Case(
        "token ids swapped for other valid ids",
        "fit --ckpt_path last",
        "train.bin has changed since it was prepared",
        setup=swap_valid_ids,
    ),
    Case("meta.json of another version", "fit --ckpt_path last", "has format version 0", setup=set_meta_version),
    Case("vocab size other than the checkpoint's", "fit --ckpt_path last --data.vocab_size 400", "vocab_size=320"),
    Case(
        "tokenizer other than the checkpoint's",
        "fit --ckpt_path last --data.tokenizer_path other.json --data.data_dir other",
        "another tokenizer than other.json",
        setup=write_other_tokenizer,
    ),
    Case(
        "checkpoint of another model shape",
        "fit --config run.yaml --run_name wider --model.config.embed_dim 64 "
        "--ckpt_path lightning_logs/run/checkpoints/last.ckpt",
        "holds a model with embed_dim=32",
    ),
    Case(
        "--ckpt_path last with no run",
        "fit --ckpt_path last",
        "no run to resume",
        setup=remove_runs,
        check=nothing_started,
    ),
    Case("not a gptlit checkpoint", "sample --ckpt_path plain.ckpt", "not a gptlit checkpoint", setup=write_plain_ckpt),
    *[
        Case(
            f"pickle that runs code, to {command.split()[0]}",
            command,
            "refusing to load evil.ckpt",
            setup=write_unsafe_checkpoint,
            check=payload_never_ran,
        )
        for command in (
            "sample --ckpt_path evil.ckpt",
            "export --ckpt_path evil.ckpt --out_dir hf",
            # Lightning told to unpickle anything: gptlit's weights-only check still comes first.
            "fit --config run.yaml --run_name evil --ckpt_path evil.ckpt --weights_only false",
        )
    ],
    Case(
        "NaN loss",
        f"fit --config run.yaml --run_name nan {shlex.quote('--trainer.callbacks+=' + POISON)}",
        "training loss is nan at step 9",
        check=last_good_checkpoint_kept,
    ),
    Case(
        "NaN loss names the last good checkpoint",
        f"fit --config run.yaml --run_name nan {shlex.quote('--trainer.callbacks+=' + POISON)}",
        "/ws/lightning_logs/nan/checkpoints/last.ckpt (step 8)",  # the last good checkpoint, in the workspace copy
    ),
    *[
        Case(
            f"NaN weights, to {command.split()[0]}",
            command,
            "refusing to load nan.ckpt: 1 of 28 weight tensors hold NaN or inf (model.blocks.1.mlp.fc.weight)",
            setup=write_nan_checkpoint,
        )
        for command in ("sample --ckpt_path nan.ckpt", "export --ckpt_path nan.ckpt --out_dir hf")
    ],
    Case(
        "hub source while offline",
        "prepare --config run.yaml --data.source roneneldan/TinyStories --data.data_dir hub",
        "HF_HUB_OFFLINE is set",
    ),
    Case(
        "disk full while preparing",
        "prepare --config run.yaml --data.data_dir full",
        "cannot write full: No space left on device",
        setup=point_at_dev_full,
        runs_here=Path("/dev/full").is_char_device(),
    ),
    Case(
        "output directory not writable",
        "prepare --config run.yaml --data.data_dir blocker/data",
        "cannot write blocker/data: Not a directory",
        setup=write_blocking_file,
    ),
    Case(
        "run directory not writable",
        "fit --config run.yaml --run_name elsewhere --trainer.default_root_dir blocker/runs",
        "cannot create the run directory blocker/runs/lightning_logs/elsewhere: blocker is not a directory",
        setup=write_blocking_file,
    ),
    *[
        Case(
            f"run name that is no run, to {command}",
            command,
            "no run 'rnu' in lightning_logs; the runs there: run",
            setup=write_config_of_no_run,
        )
        for command in (
            "sample --run_name rnu",
            "export --run_name rnu --ckpt_path best --out_dir hf",
            "fit --ckpt_path last --run_name rnu",
            "fit --config rnu.yaml --ckpt_path last",  # the run a config file names
        )
    ],
    Case(
        "predict", "predict --ckpt_path last", "write stories from a checkpoint with `python -m gptlit sample", code=2
    ),
    Case(
        "text field the records lack",
        "prepare --config run.yaml --data.source stories.jsonl --data.text_field title --data.data_dir other",
        "stories.jsonl: records have no 'title' field (fields: id, story); set --data.text_field",
        setup=write_story_records,
    ),
    Case(
        "configuration the repository lacks",
        "prepare --config run.yaml --data.source fineweb-edu --data.config_name sample-100BT --data.data_dir other",
        "fineweb-edu has no configuration 'sample-100BT' (configurations: default, sample-10BT)",
        setup=write_fineweb_repository,
    ),
    Case(
        "split the source lacks",
        "prepare --config run.yaml --data.val_split dev --data.data_dir other",
        "no split 'dev' (splits: 'train'); set --data.val_split to one of them, or to null",
    ),
    Case("sample on a device that is not one", "sample --device gpu0", "--device gpu0: not a device"),
    Case(
        "export into a file",
        "export --ckpt_path last --out_dir stories.txt",
        "stories.txt is a file, not a directory",
    ),
    Case(
        "export over files that are not an export",
        "export --ckpt_path last --out_dir . --overwrite true",
        "--out_dir . holds files that are not a gptlit export (data/, lightning_logs/, run.yaml, stories.txt)",
    ),
    # Not errors: these must work.
    Case(
        "prompt longer than block_size",
        f"sample --prompt {shlex.quote(LONG_PROMPT)} --max_new_tokens 5 --seed 0",
        LONG_PROMPT,
        code=0,
    ),
    Case(
        "vocab_size above 65,535",
        "fit --config run.yaml --run_name wide --data.source wide.txt --data.tokenizer_path wide.json "
        "--data.vocab_size 70320 --data.data_dir wide --data.batch_size 4 --trainer.max_steps 2",
        "",
        code=0,
        setup=write_wide_vocabulary,
        check=wide_ids_survive,
    ),
]


# Running them --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus, ``run.yaml``, prepared data (``data``) and a run trained for 8 steps (``lightning_logs/run``)."""
    ws = tmp_path_factory.mktemp("workspace")
    write_corpus(ws / "stories.txt")
    config = yaml.safe_load(write_config(ws, name="run").read_text())
    # The copies read this corpus (a copy would be another source: its path is in the data's fingerprint)
    # and write their own data directory.
    config["data"].update(source=str(ws / "stories.txt"), data_dir="data")
    (ws / "run.yaml").write_text(yaml.safe_dump(config))
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        cli_main(["fit", "--config", "run.yaml", "--trainer.max_steps", "8"])
    finally:
        os.chdir(cwd)
    return ws


def snapshot(ws: Path) -> dict[str, str]:
    """Every regular file under ``ws`` and a hash of its bytes."""
    return {
        str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in ws.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


@dataclass
class Outcome:
    ws: Path
    before: dict[str, str]
    result: subprocess.CompletedProcess


def run_case(case: Case, workspace: Path, root: Path, clis: Queue[ForkedCli]) -> Outcome:
    ws = root / "ws"
    shutil.copytree(workspace, ws, symlinks=True)
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    cli = clis.get()
    try:
        result = cli.run(ws, shlex.split(case.command))
    finally:
        clis.put(cli)
    return Outcome(ws, before, result)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, workspace: Path, tmp_path_factory) -> dict[str, Outcome]:
    """The selected rows, run two at a time, each as `python -m gptlit` forked from a process that imported it."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    selected = [case for case in selected if case.runs_here]
    # This checkout's gptlit, not whichever one is installed.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join((str(TESTS), str(TESTS.parent)))}
    env.pop("GPTLIT_DEBUG", None)
    clis: Queue[ForkedCli] = Queue()
    for _ in range(2):
        clis.put(ForkedCli(env))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {
                case.name: pool.submit(run_case, case, workspace, tmp_path_factory.mktemp("case"), clis)
                for case in selected
            }
            return {name: future.result() for name, future in futures.items()}
    finally:
        while not clis.empty():
            clis.get().close()


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=() if c.runs_here else pytest.mark.skip(reason="not here")) for c in CASES],
)
def test_bad_input(case: Case, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.name]
    result, stderr = outcome.result, outcome.result.stderr
    assert result.returncode == case.code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    if case.code != 0:
        last_line = stderr.strip().splitlines()[-1]
        assert last_line.startswith("gptlit: error: "), last_line
        assert case.message in last_line, last_line
    else:
        assert result.stdout.startswith(case.message)
    after = snapshot(outcome.ws)
    changed = [path for path, digest in outcome.before.items() if after.get(path) != digest]
    assert not changed, f"changed or removed: {changed}"
    if case.check is not None:
        case.check(outcome.ws)


def test_offline_hub_source_fails_within_two_seconds(tmp_path: Path) -> None:
    """Timed inside the process, from the command to the error: the imports of Lightning and `datasets` (~2 s on
    a slow 2-core machine) are not the hub's fault; waiting on the network would be."""
    program = (
        "import time, datasets, gptlit.cli.main\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    gptlit.cli.main.cli_main(\n"
        "        ['prepare', '--data.source', 'roneneldan/TinyStories', '--data.data_dir', 'data']\n"
        "    )\n"
        "finally:\n"
        "    print(time.monotonic() - start)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "HF_HUB_OFFLINE is set" in result.stderr.strip().splitlines()[-1]
    assert float(result.stdout.split()[-1]) < 2.0
    assert not (tmp_path / "data").exists()
