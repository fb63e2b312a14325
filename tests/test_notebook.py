import json
from pathlib import Path

import pytest
from conftest import ROOT, run_script


def run_notebook(tmp_path, **env):
    return run_script(["notebook.py"], cwd=tmp_path, env_extra={"MPLBACKEND": "Agg", "DISPLAY": "", **env})


def check_figures(out: Path, r) -> dict:
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    names = sorted(Path(p).name for p in summary["figures"])
    assert names == ["attention_map.png", "loss_curves.png", "lr_schedule.png", "lr_sweep.png", "per_token_loss.png"]
    for name in names:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert set(summary["final_val_loss"]) == {"0.0003", "0.001", "0.003"}
    assert "hardest tokens:" in r.stdout and "T=0.7" in r.stdout
    return summary


def test_notebook_runs_headless_and_saves_figures(tmp_path):
    out = tmp_path / "figs"
    check_figures(out, run_notebook(tmp_path, NOTEBOOK_QUICK="1", NOTEBOOK_OUT=str(out)))


@pytest.mark.parametrize("env,fragment", [
    ({"NOTEBOOK_CHECKPOINT": "nope.pt"}, "NOTEBOOK_CHECKPOINT nope.pt does not exist"),
    ({"NOTEBOOK_QUICK": "yes"}, "NOTEBOOK_QUICK must be 0 or 1"),
    ({"NOTEBOOK_OUT": "a_file"}, "NOTEBOOK_OUT a_file is a file"),
])
def test_a_bad_setting_is_one_error_line(env, fragment, tmp_path):
    (tmp_path / "a_file").write_text("mine")
    r = run_notebook(tmp_path, **env)
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and errors == [errors[0]] and fragment in errors[0], r.stderr
    assert (tmp_path / "a_file").read_text() == "mine"


def test_notebook_is_percent_format():
    text = (ROOT / "notebook.py").read_text()
    assert "formats: py:percent" in text
    assert text.count("# %% [markdown]") >= 7 and text.count("\n# %%\n") >= 7
    assert "class GPTModel" not in text and "def generate(" not in text  # imports the project, never redefines it
