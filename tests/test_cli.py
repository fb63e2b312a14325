import argparse

import pytest
from conftest import run_script

import prep_dataset
import pretraining_advanced
import pretraining_simple
import wt_load


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


@pytest.mark.parametrize("module", [prep_dataset, pretraining_simple, pretraining_advanced, wt_load])
def test_every_flag_has_help_and_no_type_bool(module):
    for action in _actions(module.build_parser()):
        assert action.help, f"{module.__name__}: {action.option_strings or action.dest} has no help"
        assert action.type is not bool, f"{module.__name__}: {action.dest} uses type=bool"


@pytest.mark.parametrize("script", ["prep_dataset.py", "pretraining_simple.py", "pretraining_advanced.py",
                                    "test_smollm.py", "wt_load.py"])
def test_help_runs(script, tmp_path):
    r = run_script([script, "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "usage:" in r.stdout
