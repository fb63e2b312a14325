import json
from pathlib import Path

from conftest import ROOT, run_script


def test_notebook_runs_headless_and_saves_figures(tmp_path):
    out = tmp_path / "figs"
    r = run_script(["notebook.py"], cwd=tmp_path, env_extra={"NOTEBOOK_QUICK": "1", "NOTEBOOK_OUT": str(out),
                                                              "MPLBACKEND": "Agg", "DISPLAY": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    names = sorted(Path(p).name for p in summary["figures"])
    assert names == ["attention_map.png", "loss_curves.png", "lr_schedule.png", "lr_sweep.png", "per_token_loss.png"]
    for name in names:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert set(summary["final_val_loss"]) == {"0.0003", "0.001", "0.003"}
    assert "hardest tokens:" in r.stdout and "T=0.7" in r.stdout


def test_notebook_is_percent_format():
    text = (ROOT / "notebook.py").read_text()
    assert "formats: py:percent" in text
    assert text.count("# %% [markdown]") >= 7 and text.count("\n# %%\n") >= 7
    assert "class GPTModel" not in text and "def generate(" not in text  # imports the project, never redefines it
