"""The common changes made from outside the toolkit, the way DESIGN.md says to make them: each is a
file of the user's own (examples/plugins/), loaded with --plugin, and nothing in the toolkit names it.
Each trains through both scripts where its kind applies, resumes bit-identically, and runs under FSDP.
Then the rules of loading plugins, and settings from a file."""

import json
import math
import sys
from pathlib import Path

import faults
import pytest
from conftest import ROOT, fsdp_against_one_process, run_cli

import gpt_train as gt
import pretraining_advanced as adv
import pretraining_simple as simple
import token_cache
import wt_load
from gptkit.evals import scorer

PLUGINS = ROOT / "examples" / "plugins"  # the examples DESIGN.md points to, one per kind


def plugin(*names: str) -> list[str]:
    return [a for n in names for a in ("--plugin", str(PLUGINS / f"{n}.py"))]


@pytest.fixture(scope="module")
def lambada_file(tmp_path_factory, small_corpus):
    text = (small_corpus / "combined_1.txt").read_text()
    passages = [" ".join(text[i : i + 400].split()[1:-1]) for i in range(0, 8000, 400)]
    path = tmp_path_factory.mktemp("lambada") / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    return path


COMMON = ["--model", "debug", "--batch_size", "4", "--lr", "2e-3", "--eval_iters", "2", "--no-progress", "--log_every",
          "1", "--seed", "5", "--dtype", "fp32", "--device", "cpu", "--eval_every", "0", "--sample_every", "0",
          "--keep_last", "0", "--save_every", "3"]
USER_PARTS = ["--optimizer", "lion", "--lion_beta2", "0.98", "--lr", "3e-4", "--schedule", "wsd", "--warmup_steps", "1",
              "--wsd_decay_fraction", "0.5", "--attention", "window", "--window_size", "3", "--lambada_every", "3"]


@pytest.fixture
def advanced(small_corpus, tmp_path, lambada_file):
    return [*plugin("lion", "wsd", "layer_grad_max", "window_attention", "lambada"), "--data", str(small_corpus),
            "--cache_dir", str(tmp_path / "cache"), "--val_fraction", "0.2", *COMMON, *USER_PARTS,
            "--lambada", str(lambada_file)]


def test_five_kinds_from_plugin_files_train_and_resume_exactly_in_the_advanced_script(advanced, tmp_path, capsys):
    full = adv.main([*advanced, "--max_steps", "6", "--run_dir", str(tmp_path / "full")])
    resumed = adv.main([*advanced, "--max_steps", "6", "--run_dir", str(tmp_path / "part"), "--resume",
                        str(tmp_path / "full" / "ckpt_00000003.pt")])  # from step 3, in a folder of its own
    h = full["history"]
    for key in ("train_loss", "lr", "layer_grad_max", "lambada"):
        assert resumed["history"][key] == h[key], key  # Lion's momentum, the schedule, the metric, the evaluation
    # The schedule: warmup 1, stable to the middle, then linear to --min_lr (lr / 10).
    assert h["lr"] == pytest.approx([3e-4, 3e-4, 3e-4, 2.1e-4, 1.2e-4, 3e-5])
    # The optimizer's kind and settings in the checkpoint; its state bytes in the planner and as measured.
    ckpt = gt.load_checkpoint(full["checkpoint"])
    assert ckpt["optimizer"]["kind"] == "Lion" and tuple(ckpt["optimizer"]["param_groups"][0]["betas"]) == (0.9, 0.98)
    params = gt.count_parameters_from_config(gt.GPTConfig.from_dict(ckpt["config"]))["total"]
    assert full["optimizer_state_bytes"] == 4 * params
    # The attention's setting is architecture: recorded in the model config, a resume with another is refused.
    assert ckpt["config"]["attention"] == "window" and ckpt["config"]["parts"] == {"window": {"size": 3}}
    with pytest.raises(gt.CheckpointError, match="different model config: .*parts="):
        adv.main([*advanced, "--max_steps", "8", "--run_dir", str(tmp_path / "full"), "--resume", "auto",
                  "--window_size", "4"])
    with pytest.raises(gt.UserError, match="--window_size is a setting of --attention window"):
        adv.main([*advanced[: advanced.index("--attention")], "--window_size", "4", "--run_dir", str(tmp_path / "x")])
    # The metric: the largest block gradient norm, at most the whole gradient's norm.
    assert all(0 < m <= g for m, g in zip(h["layer_grad_max"], h["grad_norm"]))
    # The evaluation ran at 0, 3 and 6, and its last value is the scorer's on the final weights.
    model, _ = wt_load.load_ours(full["checkpoint"])
    lambada = sys.modules[next(m for m in sys.modules if m.endswith("_lambada"))]
    direct = scorer.score(model, lambada.items(lambada.read(lambada.LambadaConfig(
        Path(advanced[advanced.index("--lambada") + 1])))), "cpu", window="nanochat")
    assert h["lambada_step"] == [0, 3, 6] and h["lambada"][-1] == direct["lambada"]
    lambada_flags = ["--lambada", advanced[advanced.index("--lambada") + 1]]
    code, out, _ = run_cli(wt_load.main, [*plugin("lambada"), "eval", full["checkpoint"], *lambada_flags, "--json"],
                           capsys)  # and in wt_load.py eval, with its own flags
    assert code == 0 and json.loads(out)["lambada"] == {"lambada": h["lambada"][-1]}
    assert "| layer_grad_max " in (tmp_path / "full" / "train.log").read_text()
    code, _, err = run_cli(wt_load.main, ["to-hf", full["checkpoint"], tmp_path / "hf"], capsys)
    assert code == 2 and "--attention window has no Hugging Face equivalent" in err


def test_the_same_plugins_in_the_simple_script(small_corpus, tmp_path, lambada_file):
    flags = [*plugin("lion", "wsd", "layer_grad_max", "window_attention", "lambada"), "--data_dir", str(small_corpus),
             *COMMON, *USER_PARTS, "--lambada", str(lambada_file), "--layer_grad_max_clipped", "--max_grad_norm", "0.5"]
    full = simple.main([*flags, "--max_steps", "6", "--run_dir", str(tmp_path / "full")])
    resumed = simple.main([*flags, "--max_steps", "6", "--run_dir", str(tmp_path / "part"), "--resume",
                           str(tmp_path / "full" / "ckpt_00000003.pt")])
    for key in ("train_loss", "lr", "layer_grad_max", "lambada"):
        assert resumed["history"][key] == full["history"][key], key
    assert all(m <= 0.5 + 1e-6 for m in full["history"]["layer_grad_max"])  # measured after clipping, as asked


def test_a_file_format_plugin_and_compressed_files_out_of_the_box(tmp_path, capsys):
    import bz2
    import gzip

    import zstandard

    docs = [f"Row {i}: " + "the quick brown fox jumps over the lazy dog " * 12 for i in range(60)]
    d = tmp_path / "corpus"
    d.mkdir()
    csv_text = "id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(docs[:20]))
    (d / "a.csv").write_text(csv_text)
    (d / "b.csv.gz").write_bytes(gzip.compress(csv_text.replace("Row", "Gz row").encode()))
    (d / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in docs[20:40]).encode()))
    (d / "d.jsonl.bz2").write_bytes(bz2.compress("".join(json.dumps({"text": t}) + "\n" for t in docs[40:50]).encode()))
    (d / "e.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(docs[50:]).encode()))
    code, _, err = run_cli(token_cache.main, ["build", "--data", f"{d}/*.csv*", "--cache_dir", tmp_path / "c0"], capsys)
    assert code == 2 and "unknown kind (.csv, .csv.gz)" in err  # without the plugin
    manifest = token_cache.main([*plugin("csv_format"), "build", "--data", str(d), "--cache_dir", str(tmp_path / "c"),
                                 "--val_fraction", "0.2", "--no-progress"])
    assert manifest["documents"] == 20 + 20 + 20 + 10 + 1  # the .txt.zst file is one document
    res = adv.main([*plugin("csv_format"), "--data", str(d), "--cache_dir", str(tmp_path / "c"), "--val_fraction", "0.2",
                    *COMMON, "--max_steps", "2", "--run_dir", str(tmp_path / "r")])
    assert res["state"].step == 2


def test_a_position_that_biases_the_scores_and_a_norm_of_ones_own(small_corpus, tmp_path):
    """ALiBi (a position part with a score bias) and a bias-free LayerNorm with a setting of its own:
    they train, resume bit-identically, are recorded in the model config, and ALiBi's bias is applied
    alike with and without the KV cache and with the explicit softmax."""
    import torch

    flags = [*plugin("alibi", "bias_free_layernorm"), "--data_dir", str(small_corpus), *COMMON, "--position", "alibi",
             "--norm", "layernorm_nobias", "--layernorm_nobias_eps", "1e-6"]
    full = simple.main([*flags, "--max_steps", "6", "--run_dir", str(tmp_path / "full")])
    resumed = simple.main([*flags, "--max_steps", "6", "--run_dir", str(tmp_path / "part"), "--resume",
                           str(tmp_path / "full" / "ckpt_00000003.pt")])
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    model, ckpt = wt_load.load_ours(full["checkpoint"])
    assert ckpt["config"]["position"] == "alibi" and ckpt["config"]["parts"]["layernorm_nobias"] == {"eps": 1e-6}
    assert not any(n.endswith("ln_1.bias") for n in model.state_dict())
    prompt = torch.tensor([[464, 3290, 318, 257, 1332]])
    cached = gt.generate(model, prompt, 12, use_cache=True)
    assert torch.equal(cached, gt.generate(model, prompt, 12, use_cache=False))
    slow = GPTNoFlash(model)
    assert torch.allclose(slow(prompt), model(prompt), atol=1e-5)  # the explicit softmax adds the same bias
    # The bias is really there: without it the model computes something else.
    for block in model.h:
        block.attn.score_bias = None
    assert not torch.allclose(model(prompt), slow(prompt), atol=1e-3)


def GPTNoFlash(model):
    import copy

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "flash"):
            m.flash = False
    return twin


def test_every_plugin_runs_under_fsdp_as_on_one_process(small_corpus, tmp_path, lambada_file):
    """Two FSDP ranks (gloo), all six plugins at once: the same losses, metric and evaluation as one
    process with the same global batch. The metric sees local shards (never a DTensor) and its
    "shards" reduction adds them up."""
    d = tmp_path / "csv"
    d.mkdir()
    text = (small_corpus / "combined_1.txt").read_text()
    (d / "a.csv").write_text("text\n" + "".join(f'"{text[i:i + 3000].replace(chr(34), "")}"\n'
                                                for i in range(0, 60000, 3000)))
    flags = [*plugin("lion", "wsd", "layer_grad_max", "window_attention", "lambada", "csv_format", "alibi",
                     "bias_free_layernorm"), "--data", str(d), "--position", "alibi", "--norm", "layernorm_nobias",
             "--cache_dir", str(tmp_path / "cache"), "--val_fraction", "0.2", *COMMON, *USER_PARTS,
             "--lambada", str(lambada_file), "--max_steps", "4", "--lambada_every", "0"]
    one, two = fsdp_against_one_process(flags, tmp_path)
    assert two["train_loss"] == pytest.approx(one["history"]["train_loss"], abs=1e-5)
    assert two["layer_grad_max"] == pytest.approx(one["history"]["layer_grad_max"], rel=1e-4)
    assert two["lambada"] == one["history"]["lambada"]


# ----------------------------------------------------------------------------------------------
# The rules of loading plugins


def test_a_plugin_that_fails_is_one_line_and_leaves_nothing_registered(tmp_path, capsys):
    (tmp_path / "typo.py").write_text("import math\n\ndef broken(:\n    pass\n")
    (tmp_path / "raises.py").write_text("import math\n\nx = 1\nraise RuntimeError('no GPU here')\n")
    (tmp_path / "half.py").write_text(
        "from gptkit.optim import OptimizerSpec, register_optimizer\n"
        "register_optimizer(OptimizerSpec('half_a', 'x', None, lambda s, c: 0, kind='A'))\n"
        "register_optimizer(OptimizerSpec('adamw', 'x', None, lambda s, c: 0, kind='B'))\n")
    cases = [("typo.py", "typo.py failed to import: SyntaxError"), ("raises.py", "RuntimeError: no GPU here (line 4)"),
             ("half.py", "optimizer 'adamw' is already registered"), ("missing.py", "missing.py: no such file"),
             ("no_such_module_xyz", "no such file or module")]
    for name, fragment in cases:
        spec = str(tmp_path / name) if name.endswith(".py") else name
        code, _, err = run_cli(simple.main, ["--plugin", spec, "--max_steps", "1"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert "half_a" not in gt.OPTIMIZERS and gt.OPTIMIZERS["adamw"].kind == "AdamW"  # taken back


def test_plugins_are_recorded_and_a_resume_needs_them_unchanged_and_a_folder_never_imports_one(small_corpus,
                                                                                              tmp_path, capsys):
    marker = tmp_path / "imported"
    src = (PLUGINS / "wsd.py").read_text().replace("register_schedule(", f"open({str(marker)!r}, 'a').write('x')\n"
                                                                          "register_schedule(ScheduleSpec('wsd2', wsd, "
                                                                          "'copy', uses=('warmup_steps', 'min_lr'), "
                                                                          "config=WSDConfig))\nregister_schedule(", 1)
    src = src.replace('ScheduleSpec("wsd"', 'ScheduleSpec("wsd_copy"').replace("decay_fraction:", "fraction:")
    src = src.replace("s.config.decay_fraction", "s.config.fraction")
    mine = tmp_path / "my_wsd.py"
    mine.write_text(src)
    flags = ["--data_dir", str(small_corpus), *COMMON, "--plugin", str(mine), "--schedule", "wsd2", "--warmup_steps",
             "1", "--max_steps", "4", "--run_dir", str(tmp_path / "r")]
    simple.main([*flags, "--max_steps", "2"])
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["plugins"][0]["path"] == str(mine) and info["plugins"][0]["sha256"] == gt.sha256_file(mine)
    marker.unlink()
    without = [f for f in flags if f not in ("--plugin", str(mine))]
    code, _, err = run_cli(simple.main, [*without[: without.index("--schedule")], "--max_steps", "4", "--run_dir",
                                         tmp_path / "r", "--resume", "auto"], capsys)
    assert code == 2 and "was trained with --plugin" in err and not marker.exists()  # the folder named it: not imported
    code, out, err = run_cli(wt_load.main, ["inspect", tmp_path / "r" / "ckpt_00000002.pt"], capsys)
    assert code == 0 and not marker.exists()
    mine.write_text(src + "\n# edited\n")
    r = faults.run("pretraining_simple.py", [*flags, "--resume", "auto"])  # a new process: the edited file
    assert r.returncode == 2 and "has changed since" in r.stderr.strip().splitlines()[-1]
    mine.write_text(src)
    assert simple.main([*flags, "--resume", "auto"])["state"].step == 4


def test_a_module_plugin_by_name(tmp_path, monkeypatch):
    (tmp_path / "user_metrics.py").write_text(
        "import torch\nfrom gptkit.metrics import StepMetric, register_metric\n"
        "register_metric(StepMetric('loss_squared', lambda v: f'l2 {v:.2f}', device=lambda c: c.loss ** 2, "
        "reduce='max', history='loss_squared'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        res = simple.main(["--plugin", "user_metrics", *COMMON, "--max_steps", "2", "--run_dir", str(tmp_path / "r"),
                           "--data_dir", str(_corpus(tmp_path))])
        h = res["history"]
        assert h["loss_squared"] == pytest.approx([v * v for v in h["train_loss"]], rel=1e-6)
    finally:
        gt.STEP_METRICS.remove("loss_squared")


def _corpus(tmp_path: Path) -> Path:
    import prep_dataset

    d = tmp_path / "corpus"
    d.mkdir()
    (d / "combined_1.txt").write_text(prep_dataset.embedded_books()[0][:40000])
    return d


# ----------------------------------------------------------------------------------------------
# Settings from a file


def test_settings_from_a_toml_or_yaml_file_and_back_out_of_a_checkpoint(small_corpus, tmp_path, capsys):
    toml = tmp_path / "exp.toml"
    toml.write_text(f'data_dir = "{small_corpus}"\nmodel = "debug"\nbatch_size = 4\nmax_steps = 3\noptimizer = "muon"\n'
                    'dtype = "fp32"\nprogress = false\neval_every = 0\nsample_every = 0\n'
                    f'plugin = ["{PLUGINS / "wsd.py"}"]\nschedule = "wsd"\nwarmup_steps = 1\n\n'
                    '[muon]\nlr = 0.02\nmomentum = 0.9\n\n[wsd]\ndecay_fraction = 0.5\n')
    res = simple.main(["--config", str(toml), "--run_dir", str(tmp_path / "a"), "--muon_momentum", "0.85"])
    args = gt.load_checkpoint(res["checkpoint"])["run"]["args"]
    assert (args["muon_lr"], args["muon_momentum"], args["wsd_decay_fraction"]) == (0.02, 0.85, 0.5)  # the flag wins
    yaml = tmp_path / "exp.yaml"
    yaml.write_text(f"data_dir: {small_corpus}\nmodel: debug\nbatch_size: 4\nmax_steps: 2\nprogress: false\n"
                    "eval_every: 0\nsample_every: 0\ndtype: fp32\nmuon:\n  lr: 0.02\n")
    code, _, err = run_cli(simple.main, ["--config", yaml, "--run_dir", tmp_path / "b"], capsys)
    assert code == 2 and "--muon_lr is a setting of --optimizer muon" in err  # file settings are checked like flags
    for body, fragment in (("lr = 1e-3\nlearning_rate = 3\n", "unknown setting 'learning_rate'"),
                           ("batch_size = 'four'\n", "batch_size must be a whole number"),
                           ("lr = [\n", "is not valid TOML")):
        (tmp_path / "bad.toml").write_text(body)
        code, _, err = run_cli(simple.main, ["--config", tmp_path / "bad.toml"], capsys)
        assert code == 2 and fragment in err and str(tmp_path / "bad.toml") in err and len(err.strip().splitlines()) == 1
    # A run's recorded settings, written out, start the same run.
    code, out, _ = run_cli(wt_load.main, ["inspect", res["checkpoint"], "--config_out", tmp_path / "again.toml"], capsys)
    assert code == 0 and "python pretraining_simple.py --config again.toml" in (tmp_path / "again.toml").read_text()
    again = simple.main(["--config", str(tmp_path / "again.toml"), "--run_dir", str(tmp_path / "c")])
    assert again["history"]["train_loss"] == res["history"]["train_loss"]
    assert math.isfinite(again["history"]["train_loss"][-1])


def test_a_plugin_named_in_a_config_file_is_loaded_from_it(small_corpus, tmp_path):
    (tmp_path / "c.yaml").write_text(f"plugin: [{PLUGINS / 'lion.py'}]\noptimizer: lion\nlion_beta1: 0.8\n")
    res = adv.main(["--config", str(tmp_path / "c.yaml"), "--data", str(small_corpus), "--cache_dir",
                    str(tmp_path / "cache"), "--val_fraction", "0.2", *COMMON, "--max_steps", "2", "--run_dir",
                    str(tmp_path / "r")])
    assert gt.load_checkpoint(res["checkpoint"])["optimizer"]["param_groups"][0]["betas"][0] == 0.8


def test_no_toolkit_file_names_a_test_plugin():
    names = ("lion", "wsd", "layer_grad_max", "csv_format", "window_attention", "lambada", "Lion", "LambadaConfig")
    for path in [*ROOT.glob("*.py"), *(ROOT / "gptkit").rglob("*.py")]:
        text = path.read_text()
        assert not any(f'"{n}"' in text or f"'{n}'" in text for n in names), path


def test_a_data_source_plugin_with_settings_of_its_own(small_corpus, tmp_path, capsys):
    flags = [*plugin("toy_source"), "--data", "toy", "--toy_docs", "120", "--cache_dir", str(tmp_path / "c"),
             "--val_fraction", "0.2", *COMMON, "--max_steps", "2"]
    res = adv.main([*flags, "--run_dir", str(tmp_path / "r")])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert res["state"].step == 2 and manifest["documents"] == 120 and manifest["source"]["parts"] == [[120, 0]]
    with pytest.raises(gt.UserError, match="was built from"):  # its identity holds its settings
        adv.main([*flags, "--toy_seed", "3", "--run_dir", str(tmp_path / "r2")])
    code, _, err = run_cli(adv.main, [*plugin("toy_source"), "--data", str(small_corpus), "--toy_docs", "5",
                                      "--run_dir", tmp_path / "r3", "--model", "debug"], capsys)
    assert code == 2 and "--toy_docs is a setting of data source toy, which this run does not use" in err
