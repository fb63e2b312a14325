import json

import faults
import pytest
import torch
from conftest import run_cli, run_script

import gpt_train as gt
import pretraining_simple

# fp32: --dtype auto is bf16 on CPUs that compute it natively, so exact comparisons name the precision.
DEBUG = ["--model", "debug", "--batch_size", "4", "--eval_iter", "2", "--no-progress", "--seed", "1", "--dtype", "fp32"]


def test_script_end_to_end(small_corpus, tmp_path):
    out = tmp_path / "run"
    r = run_script(["pretraining_simple.py", "--debug", "--data_dir", small_corpus, "--output_dir", out,
                    "--no-progress"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "eval step 10: train loss" in r.stdout and "sample step 10: Every effort moves you" in r.stdout
    assert "final sample: Every effort moves you" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4 and lines[-1].startswith("step      20/20 | loss ")
    for field in ("| lr ", "| grad_norm ", "| tok/s ", "| ms/step "):
        assert field in lines[0]
    assert (out / "loss_plot.png").read_bytes()[:4] == b"\x89PNG"
    losses = json.loads((out / "losses.json").read_text())
    assert losses["step"] == list(range(1, 21)) and len(losses["train_loss"]) == 20
    assert losses["val_step"] == [0, 10, 20]
    ckpt = gt.load_checkpoint(out / "ckpt_00000020.pt")
    assert ckpt["step"] == 20 and ckpt["config"]["n_layers"] == 2 and ckpt["optimizer"]["state"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


def test_validation_loss_falls(small_corpus, tmp_path):
    res = pretraining_simple.main(["--data_dir", str(small_corpus), "--output_dir", str(tmp_path), *DEBUG,
                                   "--max_steps", "60", "--lr", "3e-3", "--eval_freq", "30", "--print_sample_iter", "0",
                                   "--log_every", "30"])
    val = res["history"]["val_loss"]
    assert len(val) == 3 and val[0] > 10.5 and val[-1] < val[0] - 2.0


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_bit_identically(optimizer, small_corpus, tmp_path):
    common = ["--data_dir", str(small_corpus), *DEBUG, "--drop_rate", "0.1", "--eval_freq", "5",
              "--print_sample_iter", "0", "--log_every", "1", "--optimizer", optimizer]
    full = pretraining_simple.main([*common, "--output_dir", str(tmp_path / "a"), "--max_steps", "12"])
    first = pretraining_simple.main([*common, "--output_dir", str(tmp_path / "b"), "--max_steps", "7"])
    assert first["state"].step == 7
    resumed = pretraining_simple.main([*common, "--output_dir", str(tmp_path / "b"), "--max_steps", "12",
                                       "--resume", "auto"])
    assert resumed["state"].step == 12
    assert resumed["history"]["step"] == list(range(1, 13))
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]  # bit-identical, dropout on
    a = gt.load_checkpoint(tmp_path / "a" / "ckpt_00000012.pt")["model"]
    b = gt.load_checkpoint(tmp_path / "b" / "ckpt_00000012.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    settings = json.loads((tmp_path / "b" / "run.json").read_text())["settings"]
    assert settings["optimizer"] == optimizer and "help" not in settings  # the run's settings, and only those


def test_resume_refuses_other_model(small_corpus, tmp_path):
    pretraining_simple.main(["--data_dir", str(small_corpus), "--output_dir", str(tmp_path), *DEBUG, "--max_steps", "2",
                             "--eval_freq", "0", "--print_sample_iter", "0"])
    with pytest.raises(gt.CheckpointError, match=r"different model config: .*n_layers=2 \(model: 4\)"):
        pretraining_simple.main(["--data_dir", str(small_corpus), "--output_dir", str(tmp_path), *DEBUG,
                                 "--max_steps", "4", "--resume", str(tmp_path / "ckpt_00000002.pt"),
                                 "--model", "small"])


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(small_corpus, tmp_path):
    out = tmp_path / "run"
    r = faults.run("pretraining_simple.py", ["--data_dir", small_corpus, "--output_dir", out, *DEBUG, "--max_steps",
                                             "100000", "--log_every", "1", "--eval_freq", "0", "--print_sample_iter", "0"],
                   {"at_step": 3, "action": "sigint"})  # Ctrl-C during step 3
    assert r.returncode == 130, r.stderr  # saved, and said it was interrupted
    assert "SIGINT received" in r.stderr
    saved = sorted(out.glob("ckpt_*.pt"))
    assert [gt.load_checkpoint(p)["step"] for p in saved] == [3]


def test_bad_data_dir_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(pretraining_simple.main, ["--data_dir", tmp_path / "none", "--debug"], capsys)
    assert code == 2 and err.startswith("error: --data_dir") and "Traceback" not in err
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "combined_1.txt").write_text("Far too short.")
    code, _, err = run_cli(pretraining_simple.main, ["--data_dir", tmp_path / "short", "--debug"], capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_corrupt_checkpoint_is_refused_and_left_alone(small_corpus, tmp_path, capsys):
    bad = tmp_path / "ckpt_00000005.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = run_cli(pretraining_simple.main, ["--data_dir", small_corpus, "--output_dir", tmp_path, "--debug",
                                                     "--resume", bad], capsys)
    assert code == 2 and "corrupt or truncated" in err and "Traceback" not in err
    assert bad.read_bytes() == b"not a checkpoint at all"


# The first 10 training losses of the debug preset on the embedded books (torch 2.13, CPU, fp32), to a
# relative 1e-6 (CPUs with other vector units may round the last bit differently). Resume tests compare
# two runs and cannot see a change that moves every run alike (init, loss, data order); this can.
GOLDEN_LOSSES = [10.831968, 10.812315, 10.789595, 10.753477, 10.764781, 10.738593, 10.693432, 10.658470,
                 10.625436, 10.598129]


def test_golden_losses_of_the_debug_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded books are prepared into ./data
    res = pretraining_simple.main(["--model", "debug", "--max_steps", "10", "--batch_size", "8", "--lr", "1e-3",
                                   "--seed", "123", "--dtype", "fp32", "--eval_every", "0", "--sample_every", "0",
                                   "--no-progress", "--run_dir", str(tmp_path / "run")])
    assert res["history"]["train_loss"] == pytest.approx(GOLDEN_LOSSES, rel=1e-6)
