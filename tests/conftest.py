"""Shared fixtures: tiny configs and corpora, and an offline environment for every test."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Nothing in the suite may wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite runs as two pytest-xdist workers (pytest.ini); each computes on one thread, and so do the
# processes it starts. The models here are tiny: two workers on one thread each finish the suite in about
# 60% of the time one process on two threads takes. Set before torch is imported; results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def registries_as_they_were():
    """What a test's plugins registered is taken back after it (a worker runs many tests in one process)."""
    from gptkit import plugins
    from gptkit.registry import ALL

    before, loaded = [(r, dict(r)) for r in ALL], dict(plugins._LOADED)
    yield
    for registry, items in before:
        registry.clear()
        registry.update(items)
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)


@pytest.fixture(autouse=True)
def gpt2_tokenizer_after():
    """A test that made another tokenizer the process's (--tokenizer, a checkpoint's own) gives GPT-2's
    back: the next test starts as a new process would."""
    yield
    from gptkit import tokenizer

    tokenizer.use_tokenizer(None)


@pytest.fixture
def tiny_cfg():
    import gpt_train as gt

    return gt.get_config("debug", vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=2)


@pytest.fixture(scope="session")
def sample_books(tmp_path_factory):
    """The four embedded Gutenberg books as raw files (exactly what --sample writes)."""
    import prep_dataset

    raw = tmp_path_factory.mktemp("raw")
    paths = prep_dataset.write_embedded_sample(raw, log=lambda *a: None)
    return raw, paths


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, sample_books):
    """A ~60 KB slice of a real cleaned book as a combined_1.txt folder: enough for a few hundred
    debug-model windows, quick to tokenize."""
    import prep_dataset

    raw, paths = sample_books
    text = prep_dataset.process_book(paths[0]).text
    d = tmp_path_factory.mktemp("corpus")
    (d / "combined_1.txt").write_text(text[:60000], encoding="utf-8")
    return d


def newest_checkpoint(run_dir):
    """(step, path) of the newest checkpoint of the run in run_dir (by the step recorded inside)."""
    import gpt_train as gt

    info = gt.read_run_info(run_dir)
    return gt.RunFolder(run_dir).index.entries(info["run_id"] if info else None)[-1]


def run_script(args, cwd, timeout=300, env_extra=None):
    """Run one of the repo's scripts (args[0], relative to the repo root) as a user would."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, str(ROOT / args[0]), *map(str, args[1:])]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(main, argv, capsys):
    """A script's main() through gpt_train.run_cli, in this process: (exit code, stdout, stderr)."""
    import gpt_train as gt

    capsys.readouterr()  # what earlier steps of the test printed is not this command's output
    try:
        gt.run_cli(lambda: main([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def fsdp_against_one_process(flags, tmp_path):
    """The advanced script on 2 FSDP ranks (gloo) and in one process with the same global batch (2
    micro-batches): (the one process's result, the FSDP run's losses.json)."""
    import json

    import faults

    import pretraining_advanced as adv

    one = adv.main([*map(str, flags), "--run_dir", str(tmp_path / "one"), "--grad_accum", "2"])
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", tmp_path / "two", "--fsdp"],
                   launcher=faults.torchrun(2))
    assert r.returncode == 0, r.stderr[-3000:]
    return one, json.loads((tmp_path / "two" / "losses.json").read_text())
