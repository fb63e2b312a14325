import argparse

import pytest
from conftest import run_script

import gpt_train as gt
import prep_dataset
import pretraining_advanced
import pretraining_simple
import token_cache
import wt_load


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


@pytest.mark.parametrize("module", [prep_dataset, pretraining_simple, pretraining_advanced, wt_load, token_cache])
def test_every_flag_has_help_and_no_type_bool(module):
    for action in _actions(module.build_parser()):
        assert action.help, f"{module.__name__}: {action.option_strings or action.dest} has no help"
        assert action.type is not bool, f"{module.__name__}: {action.dest} uses type=bool"


@pytest.mark.parametrize("script", ["prep_dataset.py", "pretraining_simple.py", "pretraining_advanced.py",
                                    "test_smollm.py", "wt_load.py", "token_cache.py"])
def test_help_runs(script, tmp_path):
    r = run_script([script, "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.parametrize("module", [prep_dataset, pretraining_simple, pretraining_advanced, wt_load, token_cache])
def test_help_names_each_default_at_most_once(module):
    fmt = gt.HelpFormatter("x")
    for action in _actions(module.build_parser()):
        text = (fmt._get_help_string(action) or "").replace("%(default)s", "D")
        assert text.count("default") <= 1 and "(default: None)" not in text, (module.__name__, action.dest, text)


def test_progress_in_a_log_file_is_a_few_plain_lines(small_corpus, tmp_path):
    """Output redirected to files (a scheduler's log): no redrawn bar, only a line every ~10%."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        r = subprocess.run([sys.executable, str(ROOT / "pretraining_simple.py"), "--debug", "--max_steps", "60",
                            "--data_dir", str(small_corpus), "--run_dir", str(tmp_path / "run"), "--log_every", "20"],
                           stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0
    text = (tmp_path / "err.log").read_text() + (tmp_path / "out.log").read_text()
    bar = [ln for ln in text.splitlines() if ln.startswith("training: ")]
    steps = [int(ln.split()[1].split("/")[0]) for ln in bar]
    # A line at every tenth of the run (and, on a slow machine, one more a minute): no redrawn bar.
    assert "\r" not in text and {6, 12, 18, 24, 30, 36, 42, 48, 54, 60} <= set(steps), bar
    assert steps == sorted(set(steps)), bar  # each line once, in order
    assert bar[-1].startswith("training: 60/60 (100%) | ") and " step/s | elapsed " in bar[-1]
    # Each progress line shows its own step's loss (the same as that step's log line), not the step before's
    logged = {int(ln.split()[1].split("/")[0]): ln.split("| loss ")[1].split()[0] for ln in text.splitlines()
              if ln.startswith("step ")}
    shown = {int(ln.split()[1].split("/")[0]): ln.split("| loss ")[1].split()[0] for ln in bar}
    both = sorted(shown.keys() & logged.keys())
    assert 60 in both and all(shown[k] == f"{float(logged[k]):.3f}" for k in both), (shown, logged)


def test_default_run_folders_keep_their_names():
    """The same command finds its run again across versions: settings that named run folders before
    the settings became typed components still give the same names; newer ones join only off-default."""
    import gpt_train as gt
    import pretraining_advanced as adv
    import pretraining_simple as simple

    for script, mod, expected in (("pretraining_simple", simple, "runs/simple-small-899257db"),
                                  ("pretraining_advanced", adv, "runs/advanced-124M-029bfcfa")):
        s = mod.parse_args([])
        assert str(gt.default_run_dir(script, s.args, mod.build_parser())) == expected
    s = adv.parse_args(["--optimizer", "muon"])
    assert str(gt.default_run_dir("pretraining_advanced", s.args, adv.build_parser())) != "runs/advanced-124M-029bfcfa"
    # Names of two commands from before the change (computed with that version):
    for argv, name in ((["--max_tokens", "1e6"], "advanced-124M-202c058d"),  # the old name of --cache_max_tokens
                       (["--optimizer", "galore", "--galore_rank", "64"], "advanced-124M-5ef5d5e2")):
        s = adv.parse_args(argv)
        assert gt.default_run_dir("pretraining_advanced", s.args, adv.build_parser()).name == name
