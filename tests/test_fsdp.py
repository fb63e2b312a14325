"""Big models on the hardware people have: FSDP2 on 2 gloo ranks against one process, sharded
checkpoints resumed on 2 and on 1 rank, activation checkpointing, the memory planner."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import faults
import pytest
import torch
from conftest import ROOT, newest_checkpoint

import gpt_train as gt
import pretraining_advanced as adv
import wt_load

STEPS = 8


@pytest.fixture(scope="module")
def flags(tmp_path_factory, small_corpus):
    cache = tmp_path_factory.mktemp("fsdp_cache")
    return ["--data", str(small_corpus), "--cache_dir", str(cache / "c"), "--val_fraction", "0.2", "--model", "debug",
            "--batch_size", "4", "--warmup_steps", "3", "--lr", "2e-3", "--eval_iters", "2", "--no-progress",
            "--log_every", "1", "--seed", "5", "--dtype", "fp32", "--device", "cpu", "--eval_every", "4",
            "--save_every", "4", "--keep_last", "0", "--max_steps", str(STEPS)]


def _torchrun(args, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "pretraining_advanced.py"), *args]
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def _losses(run_dir):
    return json.loads((run_dir / "losses.json").read_text())["train_loss"]


@pytest.fixture(scope="module")
def fsdp_run(flags, tmp_path_factory):
    """A full 2-rank FSDP run and the same global batch in one process (2 micro-batches of 4)."""
    root = tmp_path_factory.mktemp("fsdp")
    single = adv.main([*flags, "--run_dir", str(root / "single"), "--grad_accum", "2"])
    _torchrun([*flags, "--fsdp", "--run_dir", str(root / "fsdp"), "--tensorboard", "--histogram_every", "4"])
    return root, single


def test_fsdp_on_two_ranks_matches_one_process(fsdp_run):
    root, single = fsdp_run
    assert _losses(root / "fsdp") == pytest.approx(single["history"]["train_loss"], abs=1e-5)
    ckpt = root / "fsdp" / f"ckpt_{STEPS:08d}"
    assert (ckpt / "complete.json").is_file() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    sharded, _ = wt_load.load_ours(ckpt)  # read directly: no conversion by hand
    whole, _ = wt_load.load_ours(single["checkpoint"])
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids), whole(ids), atol=1e-4, rtol=1e-4)


def test_fsdp_histograms_sample_rank_zeros_shard(fsdp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = fsdp_run
    acc = EventAccumulator(str(root / "fsdp" / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    assert {"params/wte.weight", "grads/h.1.mlp.c_fc.weight"} <= set(acc.Tags()["histograms"])
    assert [e.step for e in acc.Histograms("params/wte.weight")] == [4, 8]


def test_sharded_checkpoint_exports_to_hugging_face(fsdp_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, _ = fsdp_run
    r = subprocess.run([sys.executable, str(ROOT / "wt_load.py"), "to-hf", str(root / "fsdp" / f"ckpt_{STEPS:08d}"),
                        str(tmp_path / "hf")], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    ours, _ = wt_load.load_ours(root / "fsdp" / f"ckpt_{STEPS:08d}")
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-5


def test_fsdp_stopped_by_sigterm_resumes_on_two_and_on_one_rank(flags, fsdp_run, tmp_path):
    root, _ = fsdp_run
    run = tmp_path / "run"
    # SIGTERM to torchrun during step 3, which hands it to both workers, as a scheduler's preemption would
    r = faults.run("pretraining_advanced.py", [*flags, "--fsdp", "--run_dir", run, "--save_every", "0"],
                   {"at_step": 3, "action": "sigterm_launcher", "rank": 0}, launcher=faults.torchrun(2))
    assert "SIGTERM received" in r.stderr
    assert newest_checkpoint(run)[0] == 3 and (run / "ckpt_00000003" / "complete.json").is_file()
    assert faults.run("run_status.py", [run]).returncode == 143  # what a requeue script reads
    shutil.copytree(run, tmp_path / "one")
    _torchrun([*flags, "--fsdp", "--run_dir", str(run), "--resume", "auto"])
    assert _losses(run) == _losses(root / "fsdp")  # the same 2 ranks: bit for bit
    # One process, no sharding: the shards are read into whole tensors, the data position carried over.
    one = adv.main([*flags, "--run_dir", str(tmp_path / "one"), "--resume", "auto", "--grad_accum", "2"])
    assert one["history"]["train_loss"] == pytest.approx(_losses(root / "fsdp"), abs=1e-5)


def test_a_kill_while_replacing_a_sharded_checkpoint_loses_nothing(fsdp_run, tmp_path):
    """Replacing ckpt_X renames it to .ckpt_X.old, then the sealed .ckpt_X.tmp to ckpt_X. Killed between
    the two, the folder holds no ckpt_X: the next start completes it from the sealed temp folder (the
    newer one), and removes what is not a sealed checkpoint."""
    root, _ = fsdp_run
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp", run)
    final = f"ckpt_{STEPS:08d}"
    (run / final).rename(run / f".{final}.old")
    shutil.copytree(run / f".{final}.old", run / f".{final}.tmp")
    (run / f".{final}.tmp" / "marker").write_text("the newer one")
    shutil.copytree(run / "ckpt_00000004", run / ".ckpt_00000004.tmp")
    (run / ".ckpt_00000004.tmp" / "complete.json").unlink()  # killed before it was sealed
    (run / "run.lock").unlink(missing_ok=True)
    folder = gt.RunFolder(run).claim("pretraining_advanced.py", {}, resume="auto")
    folder.release()
    assert (run / final / "marker").is_file() and folder.resume_point.path == run / final
    assert not [p.name for p in run.iterdir() if p.name.startswith(".ckpt_")]
    assert (run / "ckpt_00000004" / "complete.json").is_file()


def test_activation_checkpointing_gives_identical_losses_and_gradients():
    torch.manual_seed(0)
    cfg = gt.get_config("debug", drop_rate=0.1)
    plain = gt.GPTModel(cfg)
    recomputed = gt.GPTModel(dataclasses.replace(cfg, activation_checkpointing=True))
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randint(0, 50257, (4, 33), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for model in (plain, recomputed):
        torch.manual_seed(7)  # the same dropout masks: recomputation replays the RNG
        loss = gt.calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu")
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[0] == losses[1]
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize("optimizer", [["--optimizer", "galore", "--galore_rank", "8"], ["--optimizer", "muon"]])
def test_memory_saving_optimizers_with_activation_checkpointing_in_bf16_train(optimizer, flags, tmp_path):
    res = adv.main([*flags, "--run_dir", str(tmp_path), "--max_steps", "3", *optimizer, "--activation_checkpointing",
                    "--dtype", "bf16", "--eval_every", "0"])
    assert res["state"].step == 3 and all(torch.isfinite(torch.tensor(res["history"]["train_loss"])))


def test_estimate_memory_says_what_fits(capsys):
    adv.main(["--model", "1558M", "--estimate_memory", "--gpu_memory_gb", "24", "--batch_size", "8"])
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "cheapest change that fits: " in out
    for part in ("parameters", "gradients", "optimizer", "activations", "logits and loss", "margin", "total"):
        assert f"  {part}" in out
    adv.main(["--model", "124M", "--estimate_memory", "--gpu_memory_gb", "80", "--batch_size", "8"])
    assert ": fits; largest micro-batch that fits: " in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# A sharded checkpoint from elsewhere is data: a crafted shard index or value is refused, never run


class _Payload:
    """What an attacker pickles: loading it runs a shell command (here: it creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _reseal(folder):
    """Rewrite complete.json's checksums, as whoever crafts the files would."""
    done = json.loads((folder / "complete.json").read_text())
    done["files"] = {p.name: gt.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "complete.json"}
    (folder / "complete.json").write_text(json.dumps(done))


@pytest.fixture(scope="module")
def crafted(fsdp_run, tmp_path_factory):
    """Copies of a real sharded checkpoint: one whose .metadata is a payload, one whose optimizer
    learning rate (a non-tensor value DCP stores pickled) is a payload; each in a run folder of its own."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root, _ = fsdp_run
    out = tmp_path_factory.mktemp("crafted")
    marker = out / "PAYLOAD_RAN"
    ckpts = {}
    for kind in ("index", "value"):
        run = out / kind
        run.mkdir()
        shutil.copy(root / "fsdp" / "run.json", run / "run.json")
        ckpt = run / f"ckpt_{STEPS:08d}"
        shutil.copytree(root / "fsdp" / f"ckpt_{STEPS:08d}", ckpt)
        if kind == "index":
            (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
        else:
            model = gt.GPTModel(gt.get_config("debug"))
            opt = gt.make_adamw(model, 1e-3)
            state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
            gt.dcp_load(state, ckpt)  # the real values (through the safe reader)
            state["optimizer"]["param_groups"][0]["lr"] = _Payload(marker)
            for p in ckpt.glob("*.distcp"):
                p.unlink()
            (ckpt / ".metadata").unlink()
            dcp.save(state, checkpoint_id=str(ckpt))
        _reseal(ckpt)
        ckpts[kind] = ckpt
    return ckpts, marker


def _refused(main, argv, capsys):
    from conftest import run_cli

    code, out, err = run_cli(main, argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return code, lines


def test_the_notebook_reads_a_sharded_checkpoint(fsdp_run, tmp_path):
    from test_notebook import check_figures, run_notebook

    root, _ = fsdp_run
    out = tmp_path / "figs"
    check_figures(out, run_notebook(tmp_path, NOTEBOOK_QUICK="1", NOTEBOOK_OUT=str(out),
                                    NOTEBOOK_CHECKPOINT=str(root / "fsdp" / f"ckpt_{STEPS:08d}")))


def test_the_notebook_refuses_a_crafted_sharded_checkpoint(crafted, tmp_path):
    from test_notebook import run_notebook

    ckpts, marker = crafted
    r = run_notebook(tmp_path, NOTEBOOK_QUICK="1", NOTEBOOK_OUT=str(tmp_path / "figs"), NOTEBOOK_CHECKPOINT=str(ckpts["index"]))
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert not marker.exists() and r.returncode == 2 and len(errors) == 1 and "posix.system" in errors[0], r.stderr


@pytest.mark.parametrize("reader", ["inspect", "to-hf", "to-safetensors", "generate", "adv --resume PATH",
                                    "adv --resume auto", "adv --init_from", "simple --init_from", "simple --resume PATH"])
def test_a_crafted_shard_index_is_refused_by_every_reader(reader, crafted, flags, small_corpus, tmp_path, capsys):
    import pretraining_simple as simple

    ckpts, marker = crafted
    ckpt = ckpts["index"]
    simple_flags = ["--data_dir", str(small_corpus), "--model", "debug", "--batch_size", "4", "--max_steps", "2",
                    "--no-progress", "--dtype", "fp32"]
    calls = {
        "inspect": (wt_load.main, ["inspect", ckpt]),
        "to-hf": (wt_load.main, ["to-hf", ckpt, tmp_path / "hf"]),
        "to-safetensors": (wt_load.main, ["to-safetensors", ckpt, tmp_path / "w.safetensors"]),
        "generate": (wt_load.main, ["generate", ckpt, "--max_new_tokens", "2"]),
        "adv --resume PATH": (adv.main, [*flags, "--run_dir", tmp_path / "r", "--resume", ckpt]),
        "adv --resume auto": (adv.main, [*flags, "--run_dir", ckpt.parent, "--resume", "auto"]),
        "adv --init_from": (adv.main, [*flags, "--run_dir", tmp_path / "r", "--init_from", ckpt]),
        "simple --init_from": (simple.main, [*simple_flags, "--run_dir", tmp_path / "r", "--init_from", ckpt]),
        "simple --resume PATH": (simple.main, [*simple_flags, "--run_dir", tmp_path / "r", "--resume", ckpt]),
    }
    main, argv = calls[reader]
    code, lines = _refused(main, argv, capsys)
    assert not marker.exists(), "the payload ran"
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "posix.system" in lines[0], lines
    assert not (tmp_path / "hf").exists() and not (tmp_path / "w.safetensors").exists()


def test_a_crafted_value_in_the_shards_is_refused_on_resume(crafted, flags, tmp_path, capsys):
    ckpts, marker = crafted
    code, lines = _refused(adv.main, [*flags, "--run_dir", tmp_path / "r", "--resume", ckpts["value"]], capsys)
    assert not marker.exists(), "the payload ran"
    assert code == 2 and len(lines) == 1 and "is not plain data" in lines[0], lines
    # Readers of the weights alone never touch the optimizer's values: the model loads.
    model, _ = wt_load.load_ours(ckpts["value"])
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["index", "value"])
def test_torchrun_fsdp_resume_refuses_a_crafted_checkpoint(kind, crafted, flags, tmp_path):
    ckpts, marker = crafted
    run = tmp_path / "run"
    shutil.copytree(ckpts[kind].parent, run)
    proc = _torchrun([*flags, "--fsdp", "--run_dir", str(run), "--resume", "auto"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not marker.exists()
    assert "posix.system" in err if kind == "index" else "is not plain data" in err


def test_overwrite_resuming_older_behind_newer_sharded_checkpoints(fsdp_run, flags, tmp_path):
    """--resume OLDER --overwrite in a folder of sharded checkpoints: the newer folders are moved aside
    (by their real names), and the run goes on from the older one to the same losses."""
    root, _ = fsdp_run
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp", run)
    res = adv.main([*flags, "--run_dir", str(run), "--resume", str(run / "ckpt_00000004"), "--overwrite",
                    "--grad_accum", "2"])
    assert res["state"].step == STEPS
    assert res["history"]["train_loss"] == pytest.approx(_losses(root / "fsdp"), abs=1e-5)
    moved = list((run / "previous").glob(f"*/ckpt_{STEPS:08d}"))
    assert len(moved) == 1 and (moved[0] / "complete.json").is_file()
