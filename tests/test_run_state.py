"""State on disk that a run owns: bad inputs refused before any work and without touching a file,
kills at any point recovered exactly, pruning of this run's checkpoints only, one live run per folder."""

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys

import faults
import numpy as np
import pytest
import torch
from conftest import ROOT, newest_checkpoint

import gpt_train as gt
import prep_dataset
import pretraining_advanced as adv
import pretraining_simple as simple
import test_smollm
import token_cache as tc
import wt_load

DEBUG = ["--model", "debug", "--batch_size", "4", "--eval_iters", "2", "--no-progress", "--seed", "1",
         "--sample_every", "0", "--log_every", "1", "--dtype", "fp32"]


# ----------------------------------------------------------------------------------------------
# A world of pre-existing files that no failing command may change


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_corpus):
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(small_corpus, w / "corpus")
    simple.main(["--data_dir", str(w / "corpus"), "--run_dir", str(w / "run_a"), *DEBUG, "--max_steps", "2"])
    (w / "user_dir").mkdir()
    (w / "user_dir" / "model_v1.bin").write_bytes(b"my weights")
    (w / "user_dir" / "pytorch_model.bin").write_bytes(b"more of my weights")
    (w / "a_file").write_text("not a folder")
    import hellaswag_items

    hellaswag_items.write(w / "hs.jsonl", "\n".join(prep_dataset.embedded_books()), 2)
    (w / "latin1").mkdir()
    (w / "latin1" / "combined_1.txt").write_bytes("Caf\xe9 ".encode("latin-1") * 2000)
    rows = [{"text": f"Row {i}: " + "words and more words " * 20} for i in range(60)]
    for name, second in (("bad_json", '{"text": "fine"}\n{"text": broken\n'), ("bad_utf8", None),
                         ("bad_column", '{"body": "no text column here"}\n')):
        d = w / name
        d.mkdir()
        (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if second is None:
            (d / "b.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
        else:
            (d / "b.jsonl").write_text(second)
    kw = dict(val_fraction=0.2, shard_tokens=4096, progress=False, log=lambda *a: None)
    m = tc.build_cache(tc.resolve_source(str(w / "corpus")), w / "cache_oov", **kw)
    shard = w / "cache_oov" / m["shards"]["train"][0]["name"]
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[7] = 60000  # same size, an id past the vocabulary
    ids.tofile(shard)
    (w / "changing").mkdir()
    (w / "changing" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tc.build_cache(tc.resolve_source(str(w / "changing")), w / "cache_changed", **kw)
    text = (w / "changing" / "data.jsonl").read_text()
    (w / "changing" / "data.jsonl").write_text(text.replace("Row 5:", "Row 6:"))  # same size, new content
    (w / "damaged_run").mkdir()
    shutil.copy(w / "run_a" / "run.json", w / "damaged_run" / "run.json")
    (w / "damaged_run" / "ckpt_00000004.pt").write_bytes(b"garbage")
    (w / "hf_null").mkdir()
    (w / "hf_null" / "config.json").write_text("null")
    (w / "hf_number").mkdir()
    (w / "hf_number" / "config.json").write_text("42")
    (w / "hf_binary").mkdir()
    (w / "hf_binary" / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (w / "hf_str").mkdir()
    (w / "hf_str" / "config.json").write_text(json.dumps({"vocab_size": 50257, "n_embd": "32", "n_head": 2,
                                                          "n_layer": 2}))
    no_config = {k: v for k, v in torch.load(w / "run_a" / "ckpt_00000002.pt", weights_only=True).items()
                 if k != "config"}
    torch.save(no_config, w / "no_config.pt")
    _bounded_world(w)
    return w


def _bounded_world(w):
    """Inputs of the bounded-inputs audit: a YAML alias bomb, oversized settings, Hugging Face configs
    that do not fit their weights or this toolkit, a file of zeros."""
    (w / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                                 "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nlr: [*c, *c, *c, *c, *c, *c, *c, *c]\n")
    (w / "big.yaml").write_text("seed: 1\n# " + "x" * (2 << 20) + "\n")
    (w / "long_value.yaml").write_text("lr: " + "y" * 500_000 + "\n")
    from safetensors.torch import save_file
    tiny = {"transformer.wte.weight": torch.zeros(50257, 8)}
    for name, hf in (("hf_huge", {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 8192, "n_head": 64, "n_layer": 400}),
                     ("hf_vocab", {"model_type": "llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
                                   "num_hidden_layers": 2, "num_attention_heads": 4}),
                     ("hf_mistral", {"model_type": "mistral", "vocab_size": 50257, "hidden_size": 64,
                                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "max_position_embeddings": 4096, "sliding_window": 1024})):
        (w / name).mkdir()
        (w / name / "config.json").write_text(json.dumps(hf))
        save_file(tiny, str(w / name / "model.safetensors"))
    import zstandard

    (w / "zeros").mkdir()
    with zstandard.open(w / "zeros" / "zeros.txt.zst", "wb") as f:
        for _ in range(80):
            f.write(bytes(1 << 20))


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rel(w, main, argv):
    argv = [",".join(str(w / p[2:]) if p.startswith("W/") else p for p in a.split(",")) for a in argv]
    return [*argv, "--model", "debug", "--no-progress"] if main is adv.main else argv


S, A = simple.main, adv.main
BAD_INPUTS = [
    # (main, argv, fragment of the one error line); "W/..." is a path in the world
    (S, ["--batch_size", "0"], "--batch_size must be at least 1"),
    (S, ["--grad_accum", "0"], "--grad_accum must be at least 1"),
    (S, ["--max_grad_norm", "-1"], "--max_grad_norm must be a finite number >= 0"),
    (S, ["--max_steps", "-5"], "--max_steps must be at least 1"),
    (S, ["--lr", "-1"], "--lr must be a number > 0"),
    (S, ["--lr", "nan"], "--lr must be a number > 0"),
    (S, ["--lr", "0"], "--lr must be a number > 0"),
    (S, ["--eval_iters", "0"], "--eval_iters must be at least 1"),
    (S, ["--context_length", "100000"], "--context_length must be between 1 and 65536"),
    (S, ["--drop_rate", "1.5"], "--drop_rate must be in [0, 1)"),
    (S, ["--keep_last", "-1"], "--keep_last must be >= 0"),
    (S, ["--val_fraction", "0"], "--val_fraction must be between 0 and 1"),
    (S, ["--model", "huge"], "unknown model preset 'huge'"),
    (S, ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (S, ["--run_dir", "W/a_file"], "is a file"),
    (S, ["--run_dir", "W/a_file/sub"], "cannot create run folder"),
    (S, ["--run_dir", "W/run_a"], "already holds run"),
    (S, ["--run_dir", "W/run_a", "--resume", "W/missing.pt"], "does not exist"),
    (S, ["--run_dir", "W/new1", "--resume", "W/a_file"], "corrupt or truncated"),
    (S, ["--run_dir", "W/damaged_run", "--resume", "auto"], "no checkpoint in"),
    (S, ["--run_dir", "W/new2", "--data_dir", "W/missing"], "--data_dir"),
    (S, ["--run_dir", "W/new3", "--data_dir", "W/latin1"], "is not UTF-8"),
    (S, ["--run_dir", "W/new4", "--init_from", "W/missing_weights"], "missing_weights"),
    (A, ["--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
    (A, ["--optimizer", "galore", "--galore_rank", "0"], "--galore_rank must be at least 1"),
    (A, ["--galore_rank", "8"], "--galore_rank is a setting of --optimizer galore"),
    (A, ["--max_tokens", "nan"], "--cache_max_tokens must be a number of tokens"),
    (A, ["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
    (A, ["--lr", "1e-4", "--min_lr", "1e-3"], "--min_lr 0.001 is above --lr"),
    (A, ["--total_batch_tokens", "100"], "not a multiple"),
    (A, ["--shard_tokens", "10"], "--shard_tokens must be at least 4096"),
    (A, ["--dist_timeout_min", "0"], "--dist_timeout_min must be"),
    (A, ["--fsdp", "--optimizer", "galore"], "--optimizer galore cannot run on sharded parameters"),
    (A, ["--cpu_offload"], "--cpu_offload offloads FSDP's shards: add --fsdp"),
    (A, ["--fsdp"], "--fsdp shards over the processes torchrun starts"),
    (A, ["--gpu_memory_gb", "-3", "--estimate_memory"], "--gpu_memory_gb must be"),
    (A, ["--run_dir", "W/new5", "--data", "W/corpus", "--cache_dir", "W/user_dir"], "is not empty and holds no token cache"),
    (A, ["--run_dir", "W/new6", "--data", "W/bad_json", "--cache_dir", "W/c1"], "b.jsonl line 2 is not valid JSON"),
    (A, ["--run_dir", "W/new7", "--data", "W/bad_utf8", "--cache_dir", "W/c2"], "b.jsonl is not UTF-8"),
    (A, ["--run_dir", "W/new8", "--data", "W/bad_column", "--cache_dir", "W/c3"], "b.jsonl has no text column 'text'"),
    (A, ["--run_dir", "W/new9", "--data", "W/corpus", "--cache_dir", "W/cache_oov", "--val_fraction", "0.2"],
     "holds token id 60000"),
    (A, ["--run_dir", "W/new10", "--data", "W/changing", "--cache_dir", "W/cache_changed", "--val_fraction", "0.2"],
     "data.jsonl changed content"),
    (A, ["--run_dir", "W/new11", "--data", "smollm:cosmo"], "no subset 'cosmo'"),
    (A, ["--run_dir", "W/new12", "--data", "W/corpus,W/bad_json", "--data_mix", "1,x"], "--data_mix"),
    (wt_load.main, ["from-hf", "W/hf_null", "W/o1.pt"], "holds NoneType, not a JSON object"),
    (wt_load.main, ["from-hf", "W/hf_number", "W/o2.pt"], "holds int, not a JSON object"),
    (wt_load.main, ["from-hf", "W/hf_binary", "W/o3.pt"], "is not valid JSON"),
    (wt_load.main, ["from-hf", "W/hf_str", "W/o4.pt"], "emb_dim must be a positive whole number, got '32'"),
    (wt_load.main, ["from-hf", "W/hf_null", "W/run_a/ckpt_00000002.pt"], "already exists"),
    (wt_load.main, ["inspect", "W/no_config.pt"], "not a checkpoint written by this toolkit"),
    (wt_load.main, ["to-hf", "W/no_config.pt", "W/o5"], "not a checkpoint written by this toolkit"),
    (wt_load.main, ["to-safetensors", "W/run_a/ckpt_00000002.pt", "W/a_file"], "already exists"),
    (wt_load.main, ["generate", "W/no_config.pt"], "not a checkpoint written by this toolkit"),
    (prep_dataset.main, ["--data_dir", "W/corpus", "--output_dir", "W/o6", "--max_size_mb", "nan"], "--max_size_mb"),
    (prep_dataset.main, ["--data_dir", "W/corpus", "--output_dir", "W/o7", "--workers", "0"], "--workers"),
    (prep_dataset.main, ["--data_dir", "W/corpus", "--output_dir", "W/o8", "--retries", "0"], "--retries"),
    (tc.main, ["build", "--data", "W/corpus", "--cache_dir", "W/user_dir"], "is not empty and holds no token cache"),
    # Values that used to be silently wrong, or to end in a traceback
    (S, ["--seed", "99999999999999999999999"], "--seed must be a whole number from 0 to 4294967295"),
    (S, ["--device", "mps"] if not torch.backends.mps.is_available() else ["--device", "xla"], "--device"),
    (S, ["--debug", "--model", "small"], "--debug and --model cannot be used together"),
    (S, ["--max_steps", "3", "--n_epochs", "2"], "--max_steps and --n_epochs cannot be used together"),
    (A, ["--grad_accum", "2", "--total_batch_tokens", "1024"], "--grad_accum and --total_batch_tokens cannot be used"),
    (A, ["--max_steps", "2", "--train_tokens", "1000"], "--max_steps and --train_tokens cannot be used together"),
    (A, ["--resume", "auto", "--init_from", "gpt2"], "--resume and --init_from cannot be used together"),
    (A, ["--run_dir", "W/new13", "--data", "W/corpus", "--smollm_dir", "W/corpus"], "--smollm_dir reads smollm"),
    (A, ["--schedule", "constant", "--min_lr", "1e-5"], "--min_lr has no effect with --schedule constant"),
    (A, ["--fsdp", "--optimizer", "muon"], "--optimizer muon orthogonalises whole matrices"),
    (A, ["--hellaswag_every", "10"], "--hellaswag_every has no effect without"),
    (A, ["--run_dir", "W/new14", "--hellaswag", "W/missing.jsonl"], "missing.jsonl is not a file"),
    (wt_load.main, ["generate", "W/run_a/ckpt_00000002.pt", "--temperature", "-1"], "--temperature must be"),
    (wt_load.main, ["generate", "W/run_a/ckpt_00000002.pt", "--temperature", "nan"], "--temperature must be"),
    (wt_load.main, ["generate", "W/run_a/ckpt_00000002.pt", "--temperature", "inf"], "--temperature must be"),
    (wt_load.main, ["generate", "W/run_a/ckpt_00000002.pt", "--top_k", "0"], "--top_k must be at least 1"),
    (wt_load.main, ["generate", "W/run_a/ckpt_00000002.pt", "--top_k", "-1"], "--top_k must be at least 1"),
    (wt_load.main, ["generate", "W/run_a/ckpt_00000002.pt", "--max_new_tokens", "-1"], "--max_new_tokens must be"),
    (prep_dataset.main, ["--data_dir", "W/corpus", "--output_dir", "W/a_file"], "a_file is a file"),
    (prep_dataset.main, ["--data_dir", "W/corpus", "--output_dir", "W/o9", "--languages", ""], "--languages needs"),
    (prep_dataset.main, ["--data_dir", "W/corpus", "--output_dir", "W/o10", "--max_books", "5"], "--max_books limits"),
    (prep_dataset.main, ["--data_dir", "W/corpus", "--output_dir", "W/o11", "--max_book_mb", "0"], "--max_book_mb"),
    (test_smollm.main, ["--quick", "--output_dir", "W/a_file"], "a_file is a file"),
    # A mistyped path is a missing path, wherever a path or a hub id is taken (not a failed hub lookup)
    (wt_load.main, ["generate", "./no/such/folder"], "source ./no/such/folder: no such file or folder"),
    (wt_load.main, ["eval", "no/such/folder", "--hellaswag", "W/hs.jsonl"], "source no/such/folder: no such file"),
    (wt_load.main, ["from-hf", "W/no/such", "W/o12.pt"], "/no/such: no such file or folder"),
    (wt_load.main, ["inspect", "W/no/such.pt"], "no/such.pt does not exist"),
    (S, ["--run_dir", "W/new15", "--init_from", "./no/such/folder"], "--init_from ./no/such/folder: no such file"),
    (A, ["--run_dir", "W/new16", "--init_from", "no/such/folder"], "--init_from no/such/folder: no such file"),
    (A, ["--run_dir", "W/new17", "--data", "./no/such/folder"], "--data ./no/such/folder: no such file or folder"),
    (S, ["--run_dir", "W/new18", "--data_dir", "./no/such/folder"], "--data_dir no/such/folder is not a folder"),
    # Refused before the run folder is touched: a finished run resumed with other parts or bad settings stays
    # finished (run.json, the log and the checkpoints byte for byte), and --check finds what the run would refuse
    (S, ["--data_dir", "W/corpus", "--run_dir", "W/run_a", *DEBUG, "--max_steps", "4", "--resume", "auto", "--mlp",
         "swiglu"], "different model config"),
    (S, ["--data_dir", "W/corpus", "--run_dir", "W/run_a", *DEBUG, "--max_steps", "4", "--resume", "auto", "--depth",
         "2"], "different model config"),
    (S, ["--data_dir", "W/corpus", "--run_dir", "W/run_a", *DEBUG, "--max_steps", "4", "--resume", "auto", "--optimizer",
         "muon"], "optimizer"),
    (S, ["--run_dir", "W/run_a", "--resume", "auto", "--schedule", "constant", "--min_lr", "1e-5"],
     "--min_lr has no effect with --schedule constant"),
    (S, ["--run_dir", "W/new19", "--resume", "W/missing.pt", "--check"], "missing.pt does not exist"),
    (S, ["--run_dir", "W/new20", "--depth", "10000"], "more than the"),
    (A, ["--run_dir", "W/new21", "--depth", "10000", "--check"], "more than the"),
    # Settings files: no aliases, a size cap, numbers as people write them, short excerpts of bad values
    (S, ["--config", "W/bomb.yaml"], "aliases (*name) are not accepted"),
    (S, ["--config", "W/big.yaml"], "is larger than 1 MiB"),
    (S, ["--config", "W/long_value.yaml"], "lr must be a number, got 'yyyy"),
    # Hugging Face folders: a config that does not fit its weights is refused before anything is allocated
    (wt_load.main, ["from-hf", "W/hf_huge", "W/o13.pt"], "its config.json and its weights disagree"),
    (wt_load.main, ["from-hf", "W/hf_vocab", "W/o14.pt"], "32,000-token vocabulary"),
    (wt_load.main, ["from-hf", "W/hf_mistral", "W/o15.pt"], "sliding window of 1024 tokens"),
    (S, ["--run_dir", "W/new22", "--init_from", "W/hf_huge"], "its config.json and its weights disagree"),
    # Text with no place to cut it is refused, after a bounded read
    (A, ["--run_dir", "W/new23", "--data", "W/zeros", "--cache_dir", "W/c4"], "no space or line break"),
]


def test_cuda_rng_state_is_this_processs_gpu_only(monkeypatch):
    """Saved: the current GPU's generator, once CUDA is in use (never a context opened on every GPU).
    Restored: that state, or from an older checkpoint's per-GPU list the entry of this process's GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda" not in gt.capture_rng_state()  # a CPU run on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("all"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t: calls.append(int(t[0])))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    state = gt.capture_rng_state()
    assert state["cuda"].tolist() == [7]
    gt.restore_rng_state(state)
    gt.restore_rng_state({**state, "cuda": [torch.tensor([3], dtype=torch.uint8), torch.tensor([4], dtype=torch.uint8)]})
    assert calls == [7, 4]


@pytest.mark.parametrize("main,argv,fragment", BAD_INPUTS, ids=[f"{m.__module__}:{' '.join(a)[:40]}"
                                                                 for m, a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_touches_nothing(world, capsys, monkeypatch, main, argv, fragment):
    monkeypatch.chdir(world)  # default folders (runs/, data/) land in the world too
    before = _digest(world)
    with pytest.raises(SystemExit) as exit_:
        gt.run_cli(lambda: main(_rel(world, main, argv)))
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert exit_.value.code == 2, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err and len(errors[0]) < 1000
    after = _digest(world)
    assert {k: v for k, v in after.items() if k in before} == before  # every pre-existing file as it was
    assert not [k for k in after if k.endswith((".tmp", ".lock"))]


@pytest.mark.parametrize("script", ["pretraining_simple.py", "pretraining_advanced.py", "wt_load.py"])
def test_ctrl_c_while_importing_is_quiet(script, tmp_path):
    r = faults.run(script, ["--help"], {"sigint_on_import": "torch"})  # Ctrl-C as torch starts to load
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr


def test_read_only_or_full_disk_is_refused_before_training(small_corpus, tmp_path, monkeypatch):
    total, used, free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"total": total, "used": total, "free": 1000})())
    with pytest.raises(gt.UserError, match=r"only 0\.00 GiB free in .* a checkpoint of this run needs about"):
        simple.main(["--data_dir", str(small_corpus), "--run_dir", str(tmp_path / "r"), *DEBUG, "--max_steps", "2"])
    monkeypatch.undo()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("gptkit.checkpoint.folder.write_json", refuse)
    with pytest.raises(gt.UserError, match=r"cannot write to run folder .*Permission denied"):
        simple.main(["--data_dir", str(small_corpus), "--run_dir", str(tmp_path / "ro"), *DEBUG, "--max_steps", "2"])


# ----------------------------------------------------------------------------------------------
# Files get normal permissions


def test_files_respect_the_umask(small_corpus, tmp_path):
    old = os.umask(0o022)
    gt.process_umask.cache_clear()
    try:
        res = simple.main(["--data_dir", str(small_corpus), "--run_dir", str(tmp_path / "r"), *DEBUG, "--max_steps", "2"])
        model, _ = wt_load.load_ours(res["checkpoint"])
        out = wt_load.export_hf(model, tmp_path / "hf")
        m = tc.build_cache(tc.resolve_source(str(small_corpus)), tmp_path / "cache", val_fraction=0.2, progress=False)
    finally:
        os.umask(old)
        gt.process_umask.cache_clear()
    for path in [res["checkpoint"], tmp_path / "r" / "losses.json", tmp_path / "r" / "run.json",
                 tmp_path / "cache" / "manifest.json", tmp_path / "cache" / m["shards"]["train"][0]["name"],
                 out / "config.json", out / "model.safetensors"]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


# ----------------------------------------------------------------------------------------------
# One run, one folder


def _ckpt(run, step, run_id):
    state = gt.CheckpointState(gt.get_config("debug"), run_id, model=gt.ModelPart(gt.GPTModel(gt.get_config("debug"))),
                               progress=gt.TrainState(step=step))
    return gt.save_checkpoint(run / f"ckpt_{step:08d}.pt", state.state_dict())


def test_pruning_touches_only_this_runs_checkpoints(tmp_path):
    run = gt.RunFolder(tmp_path, keep_last=2)
    run.claim("test", {})
    mine = run.run_id
    for step in (2, 4, 10):
        _ckpt(tmp_path, step, mine)
    foreign = _ckpt(tmp_path, 50, "someone")
    damaged = tmp_path / "ckpt_00000099.pt"
    damaged.write_bytes(b"not a checkpoint")
    user = tmp_path / "ckpt_notes.txt"
    user.write_text("mine")
    state = gt.CheckpointState(gt.get_config("debug"), mine, model=gt.ModelPart(gt.GPTModel(gt.get_config("debug"))),
                               progress=gt.TrainState(step=6))
    new = run.save(state.state_dict())
    left = sorted(p.name for p in tmp_path.iterdir())
    # The newest of this run (step 10) and the one just written stay; steps 2 and 4 go; the other
    # run's, the damaged and the user's files are not touched.
    assert left == ["ckpt_00000006.pt", "ckpt_00000010.pt", "ckpt_00000050.pt", "ckpt_00000099.pt", "ckpt_notes.txt",
                    "run.json", "run.lock"]
    assert new.exists() and foreign.exists() and damaged.read_bytes() == b"not a checkpoint"
    run.release()
    assert not (tmp_path / "run.lock").exists()


def test_reused_default_folder_never_loses_the_new_run(small_corpus, tmp_path):
    """The old failure: a folder holding a longer earlier run pruned each new checkpoint right away."""
    common = ["--data_dir", str(small_corpus), "--run_dir", str(tmp_path), *DEBUG, "--save_every", "2",
              "--keep_last", "1"]
    simple.main([*common, "--max_steps", "8"])
    with pytest.raises(gt.UserError, match="already holds run"):
        simple.main([*common, "--max_steps", "4"])
    old_records = {n: (tmp_path / n).read_bytes() for n in ("train.log", "losses.json", "run.json", "loss_plot.png")
                   if (tmp_path / n).exists()}
    res = simple.main([*common, "--max_steps", "4", "--overwrite"])
    assert res["checkpoint"].exists() and res["checkpoint"].name == "ckpt_00000004.pt"
    assert newest_checkpoint(tmp_path)[0] == 4
    previous = list((tmp_path / "previous").iterdir())
    assert len(previous) == 1 and (previous[0] / "ckpt_00000008.pt").exists()  # moved aside, not deleted
    assert {n: (previous[0] / n).read_bytes() for n in old_records} == old_records  # and the records with them


def test_resuming_behind_newer_checkpoints_is_refused(small_corpus, tmp_path):
    common = ["--data_dir", str(small_corpus), "--run_dir", str(tmp_path), *DEBUG, "--save_every", "2", "--keep_last", "0"]
    simple.main([*common, "--max_steps", "6"])
    with pytest.raises(gt.UserError, match=r"newer checkpoints of this run \(step 6\)"):
        simple.main([*common, "--max_steps", "6", "--resume", str(tmp_path / "ckpt_00000004.pt")])
    abandoned = json.loads((tmp_path / "losses.json").read_text())
    res = simple.main([*common, "--max_steps", "6", "--resume", str(tmp_path / "ckpt_00000004.pt"), "--overwrite",
                       "--drop_rate", "0.1"])  # another path from step 4 on: the abandoned steps 5-6 differ
    aside = next((tmp_path / "previous").iterdir())
    assert res["state"].step == 6 and (aside / "ckpt_00000006.pt").exists()
    # The records of the abandoned steps stay beside their checkpoint; the run's own go on from step 4.
    assert json.loads((aside / "losses.json").read_text()) == abandoned
    assert (aside / "loss_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((aside / "run.json").read_text())["status"]["state"] == "finished"
    losses = res["history"]["train_loss"]
    assert losses[:4] == abandoned["train_loss"][:4] and losses[4:] != abandoned["train_loss"][4:]


def test_a_finished_run_resumed_is_left_as_it_is(small_corpus, tmp_path):
    common = ["--data_dir", str(small_corpus), "--run_dir", str(tmp_path), *DEBUG]
    simple.main([*common, "--max_steps", "3"])
    before = (tmp_path / "ckpt_00000003.pt").read_bytes()
    res = simple.main([*common, "--max_steps", "3", "--resume", "auto"])
    assert res["checkpoint"] is None and (tmp_path / "ckpt_00000003.pt").read_bytes() == before


def test_a_second_live_run_on_the_folder_is_refused(small_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretraining_simple.py"), "--data_dir", str(small_corpus),
                             "--run_dir", str(tmp_path), *DEBUG, "--max_steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        with pytest.raises(gt.UserError, match=rf"is in use by pid {proc.pid} on .* \(.*run.lock is locked\)"):
            simple.main(["--data_dir", str(small_corpus), "--run_dir", str(tmp_path), *DEBUG, "--max_steps", "5",
                         "--resume", "auto"])
    finally:
        proc.kill()  # SIGKILL: the lock file stays, but its flock dies with the process
        proc.wait()
    assert (tmp_path / "run.lock").exists()
    res = simple.main(["--data_dir", str(small_corpus), "--run_dir", str(tmp_path), *DEBUG, "--max_steps", "5",
                       "--resume", "auto"])
    assert res["state"].step == 5 and not (tmp_path / "run.lock").exists()


# ----------------------------------------------------------------------------------------------
# Kills at any point


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory):
    return faults.make_corpus(tmp_path_factory.mktemp("faults") / "corpus")


def test_cache_build_killed_after_every_record_finishes_identical(fault_corpus, tmp_path):
    m = tc.build_cache(tc.resolve_source(str(fault_corpus)), tmp_path / "ref", log=lambda *a: None,
                       **faults.CACHE_KW)
    reference = faults.folder_digest(tmp_path / "ref")
    r = faults.adversarial_cache_trial(fault_corpus, tmp_path / "adv", reference)
    assert r["identical"] and not r["extra"], r
    assert r["kills"] == m["records"]  # a kill right after every record, the one that completed the cache too


def test_cache_build_killed_at_random_points_finishes_identical(fault_corpus, tmp_path):
    tc.build_cache(tc.resolve_source(str(fault_corpus)), tmp_path / "ref", log=lambda *a: None,
                       **faults.CACHE_KW)
    reference = faults.folder_digest(tmp_path / "ref")
    rng = random.Random(1)
    results = [faults.cache_trial(fault_corpus, tmp_path / f"c{i}", reference, faults.random_cache_plans(rng, 4))
               for i in range(8)]
    assert sum(r["kills"] for r in results) >= 3 * len(results)  # several kills in each build
    assert all(r["identical"] and not r["extra"] for r in results), results


def test_training_killed_at_random_points_resumes_bit_identically(fault_corpus, tmp_path):
    ref = faults.run("pretraining_advanced.py", faults.train_flags(fault_corpus, tmp_path / "cache", tmp_path / "ref", 12))
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = json.loads((tmp_path / "ref" / "losses.json").read_text())["train_loss"]
    plans = [{"in_write": 2, "phase": "before_rename"}, {"in_write": 3, "phase": "after_rename"},
             {"at_step": 5, "action": "sigkill"}]
    r = faults.training_trial(fault_corpus, tmp_path / "t", reference, plans, 12)
    assert r["kills"] >= 3 and r["recovered"] and not r["leftovers"], r


def test_keep_last_never_prunes_a_checkpoint_without_this_runs_id(small_corpus, tmp_path):
    """A weights file written into the run folder by hand (wt_load from-hf writes no run id) is not
    this run's: pruning leaves it, and a save at its name moves it aside instead of writing over it."""
    common = ["--data_dir", str(small_corpus), "--run_dir", str(tmp_path), *DEBUG, "--save_every", "1", "--keep_last", "1"]
    simple.main([*common, "--max_steps", "2"])
    for step in (1, 3):
        wt_load.save_from_model(gt.GPTModel(gt.get_config("debug")), tmp_path / f"ckpt_{step:08d}.pt", "by hand")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    simple.main([*common, "--max_steps", "4", "--resume", "auto"])
    kept = tmp_path / "ckpt_00000001.pt"
    assert kept.read_bytes() == before["ckpt_00000001.pt"]  # not pruned
    moved = list((tmp_path / "previous").glob("not-this-run-*/ckpt_00000003.pt"))
    assert len(moved) == 1 and moved[0].read_bytes() == before["ckpt_00000003.pt"]  # moved, not overwritten
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_00000001.pt", "ckpt_00000004.pt"]


# ----------------------------------------------------------------------------------------------
# A full disk (here: a file-size limit, which fails writes the same way) is one line, and leaves nothing


def _limited(args, limit_bytes, cwd):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("what", ["checkpoint", "cache shard", "combined book file", "hf export"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_space_needed(what, small_corpus, sample_books, tmp_path):
    if what == "checkpoint":
        tc.build_cache(tc.resolve_source(str(small_corpus)), tmp_path / "cache", val_fraction=0.2, progress=False,
                       log=lambda *a: None)
        args = [ROOT / "pretraining_advanced.py", "--data", small_corpus, "--cache_dir", tmp_path / "cache",
                "--val_fraction", "0.2", *DEBUG, "--max_steps", "2", "--run_dir", tmp_path / "run"]
        target, limit = "ckpt_00000002.pt", 2 << 20
    elif what == "cache shard":
        args = [ROOT / "token_cache.py", "build", "--data", small_corpus, "--cache_dir", tmp_path / "c",
                "--shard_tokens", "4096", "--no-progress"]
        target, limit = "_000000.bin", 4000
    elif what == "combined book file":
        args = [ROOT / "prep_dataset.py", "--data_dir", sample_books[0], "--output_dir", tmp_path / "out", "--workers", "1"]
        target, limit = "combined_1.txt", 1 << 20
    else:
        ckpt = wt_load.save_from_model(gt.GPTModel(gt.get_config("debug")), tmp_path / "m.pt", "test")
        args = [ROOT / "wt_load.py", "to-hf", ckpt, tmp_path / "hf"]
        target, limit = "hf", 1 << 20
    r = _limited(args, limit, tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert target in errors[0] and "it needs about" in errors[0] and "is free there" in errors[0], errors[0]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".hf.")]
    assert not leftovers, leftovers
