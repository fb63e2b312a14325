import json
import math
import os
import subprocess
import sys

import faults
import hellaswag_items
import pytest
import torch
from conftest import ROOT, newest_checkpoint, run_script

import gpt_train as gt
import prep_dataset
import pretraining_advanced as adv
from gptkit import sinks


@pytest.fixture
def base(small_corpus, tmp_path):
    """Flags for a debug-model run on the small local corpus, its cache in tmp."""
    return ["--data", str(small_corpus), "--cache_dir", str(tmp_path / "cache"), "--val_fraction", "0.2",
            "--model", "debug", "--batch_size", "4", "--warmup_steps", "3", "--lr", "2e-3", "--eval_iters", "2",
            "--no-progress", "--log_every", "1", "--seed", "5", "--dtype", "fp32"]


def test_cosine_schedule_boundaries():
    lr = lambda s: gt.cosine_lr(s, 1e-3, 1e-4, warmup_steps=10, max_steps=110)
    assert lr(0) == pytest.approx(1e-4)  # warmup starts at lr / warmup_steps, not 0
    assert lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3)  # peak right after warmup
    assert lr(60) == pytest.approx(5.5e-4)  # half way down the cosine
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_peak_flops_by_exact_gpu_name():
    from gptkit.runtime import peak_flops_for, peak_flops_of

    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12  # SXM: the MFU target's denominator
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12 and peak_flops_of("NVIDIA H200 NVL") == 835e12
    assert peak_flops_of("NVIDIA H800 PCIe") == 756e12 and peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA H200") == 989e12 and peak_flops_of("Tesla T4") is None
    assert peak_flops_of("NVIDIA RTX A1000") is None  # not the A100's: names match whole, not by substring
    assert peak_flops_for(torch.device("cpu")) is None  # no MFU on a CPU...
    assert peak_flops_for(torch.device("cpu"), override_tflops=100) == 100e12  # ...unless told the peak


def test_clipping_caps_the_update_and_logs_the_preclip_norm(tiny_cfg, small_corpus):
    torch.manual_seed(0)
    model = gt.GPTModel(tiny_cfg)
    ds = gt.TokenWindowDataset(gt.encode_documents([(small_corpus / "combined_1.txt").read_text()]), 16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tcfg = gt.TrainConfig(max_steps=1, max_grad_norm=0.05, progress=False)
    state = gt.Trainer(model, opt, gt.setup_runtime("cpu"), tcfg, batches=gt.BatchSampler(ds, 4)).train()
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert state.history["grad_norm"][0] > 0.5  # the norm before clipping
    assert delta.item() == pytest.approx(0.05, rel=1e-3)  # SGD lr=1 moves by exactly the clipped gradient


def test_prefetching_changes_no_batch_and_no_loss(tiny_cfg, small_corpus):
    """The GPU input pipeline (next batch cut in a background thread while the step runs) forced on,
    on CPU: the same batches in the same order, after a resume-style jump too, and the same losses."""
    ds = gt.TokenWindowDataset(gt.encode_documents([(small_corpus / "combined_1.txt").read_text()]), 16)
    plain, ahead = gt.BatchSampler(ds, 4, seed=5, prefetch=False), gt.BatchSampler(ds, 4, seed=5, prefetch=True)
    assert ahead.prefetch and not ahead._pin  # pinned memory only when a GPU will read the batch
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(plain.next(), ahead.next()))
    assert ahead._ahead[0] == 3  # batch 3 is already being cut
    jump = {**plain.state_dict(), "position": 11}
    plain.load_state_dict(jump)
    ahead.load_state_dict(jump)  # the batch prepared for position 3 must not be used
    for _ in range(plain.batches_per_epoch + 2):  # across an epoch boundary
        assert all(torch.equal(a, b) for a, b in zip(plain.next(), ahead.next()))

    def losses(prefetch):
        torch.manual_seed(0)
        model = gt.GPTModel(tiny_cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tcfg = gt.TrainConfig(max_steps=6, grad_accum_steps=2, progress=False)
        batches = gt.BatchSampler(ds, 4, seed=1, prefetch=prefetch)
        return gt.Trainer(model, opt, gt.setup_runtime("cpu"), tcfg, batches=batches).train().history["train_loss"]

    assert losses(True) == losses(False)


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_cfg, small_corpus, tmp_path, capsys):
    class Flaky(gt.GPTModel):
        poison_calls = {3, 5, 6, 7}

        def forward(self, idx):
            self.calls = getattr(self, "calls", 0) + 1
            out = super().forward(idx)
            return out * float("nan") if self.training and self.calls in self.poison_calls else out

    torch.manual_seed(0)
    model = Flaky(tiny_cfg)
    ds = gt.TokenWindowDataset(gt.encode_documents([(small_corpus / "combined_1.txt").read_text()]), 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tcfg = gt.TrainConfig(max_steps=20, batch_size=4, seed=0, progress=False, max_bad_steps=3, log_every=1)
    runtime = gt.setup_runtime("cpu")
    run = gt.open_run(runtime, tmp_path, "test", {})
    with pytest.raises(gt.UserError, match="3 non-finite losses in a row"):
        gt.run_training(model, opt, runtime, tcfg, ds, None, run)
    run.release()
    out = capsys.readouterr()
    assert "non-finite loss at step 3; update skipped (1/3 in a row)" in out.out + out.err
    ckpt = gt.load_checkpoint(tmp_path / "ckpt_00000003.pt")  # the last good step, saved
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_training_logs_and_resumes_bit_identically(base, tmp_path):
    full = adv.main([*base, "--run_dir", str(tmp_path / "a"), "--max_steps", "10", "--drop_rate", "0.1",
                     "--eval_every", "4"])
    part = adv.main([*base, "--run_dir", str(tmp_path / "b"), "--max_steps", "10", "--drop_rate", "0.1",
                     "--eval_every", "4", "--save_every", "4", "--keep_last", "2"])
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt_*.pt")) == ["ckpt_00000008.pt", "ckpt_00000010.pt"]
    assert part["history"]["train_loss"] == full["history"]["train_loss"]
    # Interrupt: delete everything after step 4 to simulate a preemption there, then resume.
    run = tmp_path / "c"
    adv.main([*base, "--run_dir", str(run), "--max_steps", "10", "--drop_rate", "0.1", "--eval_every", "4",
              "--save_every", "4", "--keep_last", "0"])
    for p in run.glob("ckpt_*.pt"):
        if p.name != "ckpt_00000004.pt":
            p.unlink()
    resumed = adv.main([*base, "--run_dir", str(run), "--max_steps", "10", "--drop_rate", "0.1", "--eval_every", "4",
                        "--resume", "auto"])
    assert resumed["history"]["step"] == list(range(1, 11))
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    assert resumed["history"]["lr"] == full["history"]["lr"]
    log = (run / "train.log").read_text().splitlines()
    assert log[0].startswith("# run started") and '"versions"' in log[1] and '"git"' in log[1]
    steps = [ln for ln in log if ln.startswith("step ")]
    assert steps[0].startswith("step       1/10 | loss ") and " | grad_norm " in steps[0] and " | ms/step " in steps[0]


def test_resume_after_sigterm_is_bit_identical(base, tmp_path):
    full = adv.main([*base, "--run_dir", str(tmp_path / "a"), "--max_steps", "12"])
    run = tmp_path / "b"
    # SIGTERM during step 4, as a cluster scheduler sends on preemption
    r = faults.run("pretraining_advanced.py", [*base, "--run_dir", run, "--max_steps", "12"],
                   {"at_step": 4, "action": "sigterm"})
    assert r.returncode == 143, r.stderr  # preempted after a good save: a scheduler requeues on 143
    assert "SIGTERM received" in r.stderr
    assert newest_checkpoint(run)[0] == 4
    status = faults.run("run_status.py", [run])
    assert status.returncode == 143 and "stopped at step 4 (SIGTERM)" in status.stdout
    resumed = adv.main([*base, "--run_dir", str(run), "--max_steps", "12", "--resume", "auto"])
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]


def test_bf16_autocast_and_explicit_attention(base, tmp_path):
    flash = adv.main([*base, "--run_dir", str(tmp_path / "f"), "--max_steps", "3"])
    explicit = adv.main([*base, "--run_dir", str(tmp_path / "e"), "--max_steps", "3", "--no-flash"])
    for a, b in zip(flash["history"]["train_loss"], explicit["history"]["train_loss"]):
        assert a == pytest.approx(b, abs=1e-4)
    bf16 = adv.main([*base, "--run_dir", str(tmp_path / "b"), "--max_steps", "3", "--dtype", "bf16"])
    losses = bf16["history"]["train_loss"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(flash["history"]["train_loss"][0], abs=0.05)


def test_galore_trains_and_resumes_bit_identically(base, tmp_path):
    g = ["--optimizer", "galore", "--galore_rank", "8", "--galore_update_proj_gap", "3"]
    full = adv.main([*base, *g, "--run_dir", str(tmp_path / "a"), "--max_steps", "8"])
    adv.main([*base, *g, "--run_dir", str(tmp_path / "b"), "--max_steps", "4"])
    ckpt = gt.load_checkpoint(tmp_path / "b" / "ckpt_00000004.pt")
    projectors = [s["projector"] for s in ckpt["optimizer"]["state"].values() if "projector" in s]
    assert projectors and all(p["rank"] == 8 and p["ortho_matrix"] is not None for p in projectors)
    resumed = adv.main([*base, *g, "--run_dir", str(tmp_path / "b"), "--max_steps", "8", "--resume", "auto"])
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    adamw = adv.main([*base, "--run_dir", str(tmp_path / "c"), "--max_steps", "1"])
    assert full["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    with pytest.raises(gt.CheckpointError, match="--optimizer galore"):
        adv.main([*base, "--run_dir", str(tmp_path / "b"), "--max_steps", "9", "--resume", "auto"])


def test_padded_vocabulary_is_recorded_and_resumed(base, tmp_path):
    """--pad_vocab (the default on CUDA) rounds the embedding up to 50304 rows: the checkpoint records
    it, --resume auto continues padded without the flag, bit-identically, and wt_load reads it back."""
    import wt_load

    full = adv.main([*base, "--pad_vocab", "--run_dir", str(tmp_path / "a"), "--max_steps", "6"])
    adv.main([*base, "--pad_vocab", "--run_dir", str(tmp_path / "b"), "--max_steps", "3"])
    ckpt = gt.load_checkpoint(tmp_path / "b" / "ckpt_00000003.pt")
    assert ckpt["config"]["vocab_multiple"] == 64 and ckpt["model"]["wte.weight"].shape[0] == 50304
    resumed = adv.main([*base, "--run_dir", str(tmp_path / "b"), "--max_steps", "6", "--resume", "auto"])
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    model = wt_load.load_any(str(tmp_path / "b" / "ckpt_00000006.pt"))
    assert model.cfg.vocab_multiple == 64
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == 50257
    with pytest.raises(gt.CheckpointError, match="vocab_multiple"):
        adv.main([*base, "--no-pad_vocab", "--run_dir", str(tmp_path / "b"), "--max_steps", "7", "--resume", "auto"])


def test_total_batch_tokens_sets_accumulation(base, tmp_path):
    res = adv.main([*base, "--run_dir", str(tmp_path), "--max_steps", "1", "--total_batch_tokens", str(4 * 32 * 3)])
    assert res["grad_accum"] == 3 and res["tokens_per_step"] == 384
    with pytest.raises(gt.UserError, match="not a multiple"):
        adv.main([*base, "--run_dir", str(tmp_path), "--max_steps", "1", "--total_batch_tokens", "100"])


def test_wandb_mode_follows_key_netrc_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # the ~/.netrc the code reads is this one
    assert sinks.wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert sinks.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert sinks.wandb_mode() == "disabled"


def test_wandb_offline_and_tensorboard_files(base, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    res = adv.main([*base, "--run_dir", str(run), "--max_steps", "4", "--wandb", "--tensorboard", "--eval_every", "2",
                    "--histogram_every", "2"])
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and res["wandb_run_id"] in offline[0].name
    assert list(offline[0].glob("*.wandb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})  # 0: keep every event
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/val_loss", "val/bpb"} <= set(acc.Tags()["scalars"])
    bpb = res["history"]["val_bpb"]
    assert [e.value for e in acc.Scalars("val/bpb")] == pytest.approx(bpb) and len(bpb) == 3  # steps 0, 2, 4
    assert f"val step 4 | bpb {bpb[-1]:.4f}" in (run / "train.log").read_text()
    assert [r["val/bpb"] for r in wandb_history(offline[0]) if "val/bpb" in r] == pytest.approx(bpb)
    tb_losses = [e.value for e in acc.Scalars("train/loss")]
    assert tb_losses == pytest.approx(res["history"]["train_loss"], rel=1e-6)
    assert "train/max_steps" not in acc.Tags()["scalars"]
    histograms = set(acc.Tags()["histograms"])
    assert {"params/wte.weight", "grads/wte.weight", "grads/h.1.mlp.c_fc.weight"} <= histograms
    assert [e.step for e in acc.Histograms("grads/h.0.attn.c_attn.weight")] == [2, 4]
    wandb_steps = [s for r in wandb_history(offline[0]) for s in [r.get("_step")] if "train/loss" in r]
    assert wandb_steps == [1, 2, 3, 4]
    assert any(r.get("grads/wte.weight/_type") == "histogram" for r in wandb_history(offline[0]))
    assert gt.load_checkpoint(res["checkpoint"])["run_id"] == res["wandb_run_id"]
    config = wandb_config(offline[0])  # the settings flat, under the flags' names: W&B's table, filters, sweeps
    assert config["lr"] == 2e-3 and config["batch_size"] == 4 and config["model"] == "debug" and "args" not in config
    assert config["run_info"]["model_config"]["n_layers"] == 2 and config["run_info"]["run_id"] == res["wandb_run_id"]


def test_bad_checkpoints_are_refused(base, tmp_path):
    adv.main([*base, "--run_dir", str(tmp_path / "a"), "--max_steps", "2"])
    ckpt = tmp_path / "a" / "ckpt_00000002.pt"
    with pytest.raises(gt.CheckpointError, match=r"different model config: .*n_layers=2 \(model: 3\)"):
        adv.main([*base, "--run_dir", str(tmp_path / "a"), "--max_steps", "4", "--n_layers", "3", "--resume", str(ckpt)])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    r = run_script(["pretraining_advanced.py", *base, "--run_dir", tmp_path / "x", "--max_steps", "4",
                    "--resume", corrupt], cwd=tmp_path)
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr
    # --resume auto skips a damaged newest file and takes the last good one.
    (tmp_path / "a" / "ckpt_00000003.pt").write_bytes(b"garbage")
    assert newest_checkpoint(tmp_path / "a")[1].name == "ckpt_00000002.pt"


def test_prepare_only_builds_the_cache(base, tmp_path):
    res = adv.main([*base, "--run_dir", str(tmp_path / "r"), "--prepare_only"])
    assert res["manifest"]["complete"] and (tmp_path / "cache" / "manifest.json").exists()
    assert not (tmp_path / "r").exists()


def _torchrun(flags):
    """A 2-process gloo run; --standalone picks a free port for the rendezvous."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "pretraining_advanced.py"), *flags], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[:3000]}\n...\n{r.stderr[-3000:]}"
    return r


def test_torchrun_two_ranks_match_single_process(base, tmp_path):
    flags = [*base, "--max_steps", "4", "--eval_every", "0", "--eval_iters", "5", "--device", "cpu"]
    single = adv.main([*flags, "--run_dir", str(tmp_path / "single"), "--grad_accum", "2"])
    text = "\n".join(prep_dataset.embedded_books())
    items = hellaswag_items.write(tmp_path / "hs.jsonl", text, 9, seed=2)  # 5 items on rank 0, 4 on rank 1
    r = _torchrun([*flags, "--run_dir", str(tmp_path / "ddp"), "--hellaswag", str(items)])
    assert "weights identical on all 2 ranks: True" in r.stdout
    assert r.stdout.count("step       1/4 |") == 1  # rank 0 alone logs
    ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    assert ddp["train_loss"] == pytest.approx(single["history"]["train_loss"], abs=1e-5)
    # Validation is split across the ranks and all-reduced by tokens: at the same global batch (8 sequences
    # in one process, 4 on each of 2 ranks) the same value for any world size.
    one = adv.main([*flags, "--run_dir", str(tmp_path / "one"), "--batch_size", "8", "--max_steps", "4"])
    assert ddp["val_step"] == one["history"]["val_step"] == [4]
    assert ddp["val_loss"] == pytest.approx(one["history"]["val_loss"], abs=1e-6)
    a = gt.load_checkpoint(tmp_path / "ddp" / "ckpt_00000004.pt")
    b = gt.load_checkpoint(single["checkpoint"])
    assert not any(k.startswith("module.") for k in a["model"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
    assert len(a["rng"]["per_rank"]) == 2
    # HellaSwag split across the ranks: the value of the whole set, scored in one process
    from gptkit.evals import hellaswag as hs

    model, _ = __import__("wt_load").load_ours(tmp_path / "ddp" / "ckpt_00000004.pt")
    whole = hs.score(model, hs.read_items(items), "cpu")
    assert (ddp["hellaswag"], ddp["hellaswag_norm"]) == ([whole["acc"]], [whole["acc_norm"]])


def test_fp16_loss_scaling_resumes_bit_identically(base, tmp_path):
    """fp16 autocast with a gradient scaler (a CUDA feature, exercised on CPU): the scaler's state is
    checkpointed, so a resumed run continues with the same loss scale."""
    fp16 = [*base, "--dtype", "fp16", "--eval_every", "0"]
    full = adv.main([*fp16, "--run_dir", str(tmp_path / "a"), "--max_steps", "6"])
    adv.main([*fp16, "--run_dir", str(tmp_path / "b"), "--max_steps", "3"])
    assert gt.load_checkpoint(tmp_path / "b" / "ckpt_00000003.pt")["scaler"]["scale"] > 0
    resumed = adv.main([*fp16, "--run_dir", str(tmp_path / "b"), "--max_steps", "6", "--resume", "auto"])
    assert all(math.isfinite(x) for x in full["history"]["train_loss"])
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    # The scaler counts finite steps towards its next growth: the resumed run carried the count on.
    a = gt.load_checkpoint(tmp_path / "a" / "ckpt_00000006.pt")["scaler"]
    b = gt.load_checkpoint(tmp_path / "b" / "ckpt_00000006.pt")["scaler"]
    assert a == b and a["_growth_tracker"] == 6


def wandb_history(offline_dir):
    """The history rows of an offline W&B run, read from its .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in sinks.wandb_records(next(offline_dir.glob("*.wandb")).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def wandb_config(offline_dir) -> dict:
    """The config an offline W&B run was given, read from its .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    config = {}
    for payload in sinks.wandb_records(next(offline_dir.glob("*.wandb")).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return config


def test_log_every_zero_logs_only_the_last_step(base, tmp_path):
    res = adv.main([*base, "--run_dir", str(tmp_path / "r"), "--max_steps", "4", "--log_every", "0"])
    assert [ln.split()[1] for ln in (tmp_path / "r" / "train.log").read_text().splitlines()
            if ln.startswith("step ")] == ["4/4"]
    assert res["history"]["step"] == [1, 2, 3, 4]  # every step still recorded
    for bad in ({"log_every": -1}, {"eval_every": 1.5}, {"max_steps": 0}, {"save_every": True}):
        with pytest.raises(gt.UserError, match=f"TrainConfig.{next(iter(bad))} must be a whole number"):
            gt.TrainConfig(**{"max_steps": 3, **bad})


def test_wandb_records_are_joined_across_blocks_and_torn_ends_dropped():
    """A large record (histograms) that does not fit its 32 KiB block is stored in fragments; the reader
    behind 'which steps did W&B already get' must join them, or it would log those steps twice."""
    import struct

    def log_file(payloads):
        out = bytearray(b":W&B\x00\x00\x01")
        for p in payloads:
            first, rest = True, p
            while True:
                left = 32768 - len(out) % 32768
                if left < 7:
                    out += bytes(left)
                    continue
                frag, rest = rest[: left - 7], rest[left - 7 :]
                kind = (1 if not rest else 2) if first else (4 if not rest else 3)
                out += struct.pack("<IHB", 0, len(frag), kind) + frag
                first = False
                if not rest:
                    break
        return bytes(out)

    payloads = [b"a" * 10, b"b" * 70_000, b"c" * 28_246, b"d" * 5]  # "c" leaves a 6-byte block tail: padding
    data = log_file(payloads)
    assert list(sinks.wandb_records(data)) == payloads
    assert list(sinks.wandb_records(data[:-2])) == payloads[:3]  # torn last record
    assert list(sinks.wandb_records(data[:40_000])) == payloads[:1]  # torn in the middle of fragments


def test_wandb_offline_history_after_crash_and_resume_has_each_step_once(base, tmp_path):
    flags = [*base, "--run_dir", str(tmp_path / "run"), "--max_steps", "9", "--save_every", "3", "--wandb",
             "--eval_every", "3", "--keep_last", "0"]
    adv.main([*base, "--run_dir", str(tmp_path / "warm"), "--max_steps", "1"])  # the cache exists before the crash
    # The disk fills while the step-6 checkpoint is written (run.json, ckpt 3, ckpt 6): steps 4-6 are in
    # W&B's files, the run resumes from step 3 and computes them again.
    r = faults.run("pretraining_advanced.py", flags, {"in_write": 3, "phase": "disk_full"})
    assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: could not write ")
    r = faults.run("pretraining_advanced.py", [*flags, "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({d.name.split("-")[-1] for d in runs}) == 1  # one W&B run id, resumed
    first = [row["_step"] for row in wandb_history(runs[0]) if "train/loss" in row]
    assert first == [1, 2, 3, 4, 5, 6]
    train_steps = [row["_step"] for d in runs for row in wandb_history(d) if "train/loss" in row]
    eval_steps = [row["_step"] for d in runs for row in wandb_history(d) if "eval/val_loss" in row]
    assert sorted(train_steps) == list(range(1, 10))  # each step once, across both processes
    assert sorted(eval_steps) == [0, 3, 6, 9]  # the starting point of the curve too, as in TensorBoard


def test_a_signal_during_non_finite_steps_still_stops_the_run(tiny_cfg, small_corpus):
    import signal as sig

    class AlwaysNaN(gt.GPTModel):
        def forward(self, idx):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                os.kill(os.getpid(), sig.SIGTERM)  # arrives while every step is being skipped
            return super().forward(idx) * float("nan")

    torch.manual_seed(0)
    model = AlwaysNaN(tiny_cfg)
    ds = gt.TokenWindowDataset(gt.encode_documents([(small_corpus / "combined_1.txt").read_text()]), 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tcfg = gt.TrainConfig(max_steps=50, batch_size=4, progress=False, max_bad_steps=40)
    state = gt.Trainer(model, opt, gt.setup_runtime("cpu"), tcfg, batches=gt.BatchSampler(ds, 4)).train()
    assert state.stop_reason == "SIGTERM" and state.bad_steps == 3 and state.step == 0


SECOND_SIGTERM = """
import os, signal, numpy as np, torch, gpt_train as gt
class Preempted(gt.GPTModel):
    def forward(self, idx):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's preemption, during step 2
        return super().forward(idx)
class Saving(gt.Trainer):
    def save(self):
        st = self.state
        if st.step and st.saved_step != st.step:
            os.kill(os.getpid(), signal.SIGTERM)  # repeated (or forwarded by torchrun) while the checkpoint is written
            print("saved step", st.step, flush=True)
            st.saved_step = st.step
torch.manual_seed(0)
model = Preempted(gt.get_config("debug"))
ds = gt.TokenWindowDataset(np.arange(4000, dtype=np.uint16) % 500, 16)
st = Saving(model, torch.optim.AdamW(model.parameters()), gt.setup_runtime("cpu"),
            gt.TrainConfig(max_steps=10, progress=False), batches=gt.BatchSampler(ds, 2)).train()
print("stopped", st.stop_reason, st.step)
"""


def test_a_second_sigterm_does_not_kill_the_final_save():
    r = subprocess.run([sys.executable, "-c", SECOND_SIGTERM], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["saved step 2", "stopped SIGTERM 2"]


def test_named_steps_of_a_run_work_alone(tmp_path):
    s = adv.parse_args(["--model", "debug", "--batch_size", "4", "--total_batch_tokens", str(4 * 32 * 2 * 3),
                        "--train_tokens", "1000"])
    cfg = s.shared.model_config
    plan = adv.plan_batch(s, cfg, world=2)
    assert (plan.grad_accum, plan.tokens_per_step) == (3, 768)
    assert adv.plan_steps(s, plan, 2, 10_000).max_steps == 2  # ceil(1000 / 768)
    one_epoch = adv.parse_args(["--model", "debug", "--batch_size", "4"])
    assert adv.plan_steps(one_epoch, adv.plan_batch(one_epoch, cfg, 1), 1, 100).max_steps == 25
    run = gt.open_run(gt.setup_runtime("cpu"), tmp_path, "test", {})
    log_sinks, closers = sinks.start_sinks(adv.parse_args(["--tensorboard"]).sinks, run, {"run_id": run.run_id})
    metrics = {"step": 1, "max_steps": 2, "loss": 9.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_seen": 64,
               "tokens_per_sec": 100.0, "ms_per_step": 10.0, "mfu": None}
    for sink in log_sinks:
        sink("train", metrics)
        sink("eval", {"step": 1, "val_loss": 9.75, "train_loss": 9.5})
    for close in closers:
        close()
    run.release()
    log = (tmp_path / "train.log").read_text().splitlines()
    assert log[2] == gt.format_log_line(metrics) and log[3] == "eval step 1 | val_loss 9.7500 | train_loss 9.5000"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_after_a_kill_and_a_resume_every_record_holds_each_step_once(base, tmp_path):
    """kill -9 in step 6 (checkpoints every 2): step 5 was logged by the killed process and is logged
    again after resuming from step 4; train.log and the raw TensorBoard event files (not only
    TensorBoard's own reader, which hides them) keep each step once."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    run = tmp_path / "run"
    flags = [*base, "--run_dir", run, "--max_steps", "8", "--save_every", "2", "--eval_every", "2", "--tensorboard",
             "--keep_last", "0"]
    r = faults.run("pretraining_advanced.py", flags, {"at_step": 6, "action": "sigkill"})
    assert r.returncode == -9 and newest_checkpoint(run)[0] == 4  # steps 5 logged, then lost
    adv.main([*map(str, flags), "--resume", "auto"])
    log = (run / "train.log").read_text().splitlines()
    assert [int(ln.split()[1].split("/")[0]) for ln in log if ln.startswith("step ")] == list(range(1, 9))
    assert [int(ln.split()[2]) for ln in log if ln.startswith("eval step ")] == [0, 2, 4, 6, 8]
    steps = []
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        steps += [e.step for e in EventFileLoader(str(path)).Load()
                  for v in e.summary.value if v.tag == "train/loss"]
    assert sorted(steps) == list(range(1, 9))


def test_check_says_what_the_run_would_do_and_touches_nothing(base, tmp_path):
    """--check (what launch.py runs before any worker): the same decisions as the run, read-only."""
    run = tmp_path / "run"
    adv.main([*base, "--run_dir", str(run), "--max_steps", "2"])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = adv.main([*base, "--run_dir", str(run), "--max_steps", "4", "--resume", "auto", "--check"])
    assert res["check"] == "ok" and res["resume"]["step"] == 2
    with pytest.raises(gt.UserError, match="already holds run"):
        adv.main([*base, "--run_dir", str(run), "--check"])
    with pytest.raises(gt.CheckpointError, match=r"different model config: .*n_layers=2 \(model: 3\)"):
        adv.main([*base, "--run_dir", str(run), "--resume", "auto", "--n_layers", "3", "--check"])
    with pytest.raises(gt.CheckpointError, match="trained with AdamW"):
        adv.main([*base, "--run_dir", str(run), "--resume", "auto", "--optimizer", "muon", "--check"])
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert adv.main([*base, "--run_dir", str(tmp_path / "new"), "--check"])["resume"] is None
    assert not (tmp_path / "new").exists()
