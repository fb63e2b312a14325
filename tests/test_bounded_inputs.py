"""Memory bounded by what the model sees, on every input: each input of the audit that used to take
gigabytes runs in a process of its own, whose peak RSS is measured against a limit, and ends in one
`error:` line (or in the right result) without a traceback. Plus what a refused resume must not do to
a finished run, what a foreign checkpoint must not lead to, and the Hugging Face folders people have."""

import json
import os
import subprocess
import sys

import torch
from conftest import ROOT, run_cli

import gpt_train as gt
import pretraining_advanced as adv
import pretraining_simple as simple
import run_status
import wt_load

DEBUG = ["--model", "debug", "--batch_size", "4", "--eval_iters", "2", "--no-progress", "--seed", "1",
         "--sample_every", "0", "--log_every", "1", "--dtype", "fp32"]


def peak_run(args, cwd, timeout=300):
    """A script of the repo run as a user would, in a process of its own: (exit code, stderr, peak RSS
    in MiB). The peak is the child's own (RUSAGE_CHILDREN of a fresh wrapper process)."""
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stderr.write(r.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, r.returncode)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", wrapper, sys.executable, str(ROOT / args[0]), *map(str, args[1:])]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    peak, code = map(int, r.stdout.split()[-2:])
    return code, r.stderr, peak


def one_error_line(err: str, fragment: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0]


def test_compressed_text_without_a_place_to_cut_is_refused_after_a_bounded_read(tmp_path):
    """80 MiB of zeros in a few KB of zstd: the text reader reads pieces, never the whole file."""
    import zstandard

    with zstandard.open(tmp_path / "zeros.txt.zst", "wb") as f:
        for _ in range(80):
            f.write(bytes(1 << 20))
    code, err, peak = peak_run(["token_cache.py", "build", "--data", tmp_path / "zeros.txt.zst", "--cache_dir",
                                tmp_path / "c", "--no-progress"], tmp_path)
    assert code == 2 and one_error_line(err, "no space or line break"), err
    assert peak < 900, peak


def test_a_long_text_is_read_in_pieces_whose_tokens_equal_the_whole_texts(monkeypatch, sample_books):
    """Pieces are cut only where GPT-2's pre-tokenizer splits anyway: the tokens of a book read in
    pieces of a few KB are the tokens of the whole book, byte for byte (so caches do not change)."""
    import io

    import numpy as np

    import gptkit.data.sources  # noqa: F401 (the source registry first)
    from gptkit.data import local
    from gptkit.tokenizer import encode_rows

    text = sample_books[1][0].read_text(encoding="utf-8")[:400_000] + "\n\n  tabs\there.\nend  of   text \r\n\r\n"
    whole = encode_rows([text])[0]
    for piece in (997, 4096, 65536):
        monkeypatch.setattr(local, "TEXT_PIECE", piece)
        rows = [r for batch in local._txt_rows(io.BytesIO(text.encode()), "x", "text", 1) for r in batch]
        assert len(rows) > 1 and max(len(r) for r in rows) <= 2 * piece
        assert np.array_equal(np.concatenate(encode_rows(rows)), whole), piece


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    nested = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
    (tmp_path / "bomb.yaml").write_text(nested + "lr: [*h, *h, *h, *h, *h, *h, *h, *h, *h]\n")
    code, err, peak = peak_run(["pretraining_simple.py", "--config", tmp_path / "bomb.yaml"], tmp_path, timeout=120)
    assert code == 2 and one_error_line(err, "aliases (*name) are not accepted"), err
    assert peak < 900, peak


def test_yaml_numbers_as_people_write_them(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nmin_lr: 5E-5\nweight_decay: .5e-1\nschedule: cosine\n")
    s = adv.parse_args(["--config", str(tmp_path / "c.yaml")])
    assert (s.shared.optim.lr, s.shared.schedule.min_lr, s.shared.optim.weight_decay) == (1e-3, 5e-5, 0.05)


def test_a_hugging_face_config_larger_than_its_weights_is_refused_before_allocating(tmp_path):
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 8192, "n_head": 64,
                                                "n_layer": 400}))
    save_file({"transformer.wte.weight": torch.zeros(50257, 8)}, str(hf / "model.safetensors"))
    code, err, peak = peak_run(["wt_load.py", "from-hf", hf, tmp_path / "o.pt"], tmp_path)
    assert code == 2 and one_error_line(err, "its config.json and its weights disagree"), err
    assert peak < 900, peak


def test_check_plans_the_model_and_allocates_nothing(tmp_path):
    """--check of a model of several GB plans it without building it; one that no machine of this size
    could train is refused by the planner in one line, at once."""
    code, err, peak = peak_run(["pretraining_advanced.py", "--depth", "20", "--check", "--run_dir", tmp_path / "r"],
                               tmp_path)
    assert code == 0, err
    assert peak < 900, peak  # the model alone would be 1.8 GB in fp32
    code, err, peak = peak_run(["pretraining_advanced.py", "--depth", "10000", "--check", "--run_dir", tmp_path / "r"],
                               tmp_path, timeout=60)
    assert code == 2 and one_error_line(err, "pick a smaller --model or --depth"), err


def test_a_core_item_of_a_huge_field_is_refused_after_a_bounded_read(tmp_path):
    from test_core import make_bundle

    bundle = make_bundle(tmp_path / "bundle", n_items=6, fewshot=(1, 0, 1, 1), long_item=False)
    sparse = tmp_path / "sparse.jsonl"
    with open(sparse, "wb") as f:
        f.truncate(200 << 20)  # 200 MB of zeros and no line break: one "line"
    (bundle / "eval_data" / "mc.jsonl").unlink()
    os.symlink(sparse, bundle / "eval_data" / "mc.jsonl")  # allowed by path? no: it points outside
    code, err, _ = peak_run(["wt_load.py", "eval", tmp_path / "none.pt", "--core", bundle], tmp_path)
    assert code == 2 and one_error_line(err, "points outside the bundle"), err
    (bundle / "eval_data" / "mc.jsonl").unlink()
    os.replace(sparse, bundle / "eval_data" / "mc.jsonl")
    code, err, peak = peak_run(["wt_load.py", "eval", tmp_path / "none.pt", "--core", bundle], tmp_path)
    assert code == 2 and one_error_line(err, "mc.jsonl line 1 is longer than 4 Mi characters"), err
    assert peak < 900, peak


# ----------------------------------------------------------------------------------------------
# A refused resume leaves a finished run as it was; requeue scripts are told the truth


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "run.lock"}


def test_a_refused_resume_leaves_a_finished_modern_run_finished(small_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--data", str(small_corpus), "--cache_dir", str(tmp_path / "cache"), "--val_fraction", "0.2", *DEBUG,
            "--arch", "modern", "--run_dir", str(run)]
    adv.main([*base, "--max_steps", "2"])
    before = _files(run)
    assert run_status.main([str(run)])["exit_code"] == 0
    for other in (["--arch", "gpt2"], ["--mlp", "gelu"], ["--no-qk_norm"], ["--n_kv_heads", "1"], ["--n_layers", "3"],
                  ["--schedule", "constant", "--min_lr", "1e-5"]):
        argv = [*base, "--max_steps", "4", "--resume", "auto"]
        argv = [a for a in argv if a not in ("--arch", "modern")] + (["--arch", "modern"] if other[0] != "--arch" else [])
        code, _, err = run_cli(adv.main, [*argv, *other], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (other, err)
        assert _files(run) == before, other  # run.json, train.log, losses, checkpoints: byte for byte
        assert run_status.main([str(run)])["exit_code"] == 0  # still finished: a requeue loop stops


def test_a_refusal_after_the_claim_gives_run_json_back(small_corpus, tmp_path, capsys, monkeypatch):
    """What only the data can contradict (here: a cache folder that holds something else) is found after
    the folder is claimed: run.json is given back as it was, and nothing else was written."""
    run = tmp_path / "run"
    base = ["--data_dir", str(small_corpus), *DEBUG, "--run_dir", str(run)]
    simple.main([*base, "--max_steps", "2"])
    before = _files(run)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    code, _, err = run_cli(simple.main, [*base, "--max_steps", "4", "--resume", "auto", "--cache_dir", tmp_path / "cache"],
                           capsys)
    assert code == 2 and "holds no token cache" in err, err
    assert _files(run) == before
    assert run_status.main([str(run)])["exit_code"] == 0


# ----------------------------------------------------------------------------------------------
# A foreign checkpoint never leads to an import; the dtype that ran is recorded


def test_config_out_names_plugins_in_a_comment_and_records_the_dtype_that_ran(small_corpus, tmp_path):
    plugin = str(ROOT / "examples" / "plugins" / "wsd.py")
    res = simple.main(["--plugin", plugin, "--schedule", "wsd", "--data_dir", str(small_corpus), *DEBUG[:-2],
                       "--max_steps", "2", "--run_dir", str(tmp_path / "r")])
    out = tmp_path / "run.toml"
    wt_load.main(["inspect", str(res["checkpoint"]), "--config_out", str(out)])
    text = out.read_text()
    settings = gt.read_config_file(out)
    assert "plugin" not in settings and f"# the run loaded a plugin: {plugin!r}" in text
    assert settings["dtype"] == gt.auto_dtype(torch.device("cpu"))[0]  # what auto chose, not "auto"


# ----------------------------------------------------------------------------------------------
# The Hugging Face folders people have


def _tiny_llama(tmp_path, small_corpus, extra=()):
    flags = ["--data_dir", str(small_corpus), *DEBUG, "--arch", "llama", "--max_steps", "2", *extra]
    res = simple.main([*flags, "--run_dir", str(tmp_path / "llama")])
    wt_load.main(["to-hf", str(res["checkpoint"]), str(tmp_path / "hf")])
    return flags, tmp_path / "hf"


def test_the_toolkits_own_llama_export_continues_with_or_without_flags(small_corpus, tmp_path):
    flags, hf = _tiny_llama(tmp_path, small_corpus)
    config = json.loads((hf / "config.json").read_text())
    assert config["dtype"] == "float32" and config["transformers_version"] and config["pad_token_id"] == 50256
    assert config["max_position_embeddings"] >= 8192  # rotary: no warning on prompts past the training context
    assert (hf / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.pad_token == "<|endoftext|>" and tok("Every effort moves you")["input_ids"] == \
        gt.get_tokenizer().encode("Every effort moves you")
    same = simple.main([*flags, "--init_from", str(hf), "--run_dir", str(tmp_path / "same")])  # the flags that trained it
    context = str(gt.get_config("debug").context_length)  # rotary: the context is the run's choice
    bare = simple.main(["--data_dir", str(small_corpus), *DEBUG[2:], "--init_from", str(hf), "--max_steps", "2",
                        "--context_length", context, "--run_dir", str(tmp_path / "bare")])  # no size or part flags
    assert bare["history"]["train_loss"] == same["history"]["train_loss"]
    longer = simple.main([*flags, "--init_from", str(hf), "--context_length", "64", "--run_dir", str(tmp_path / "ctx")])
    assert longer["state"].step == 2  # rotary: another training context is allowed


def test_a_flag_that_disagrees_with_init_from_is_named(small_corpus, tmp_path, capsys):
    flags, hf = _tiny_llama(tmp_path, small_corpus)
    for flag, value in (("--n_layers", "5"), ("--mlp", "gelu"), ("--rotary_base", "500000")):
        code, _, err = run_cli(simple.main, [*flags, "--init_from", hf, flag, value, "--run_dir", tmp_path / "x"], capsys)
        assert code == 2 and f"{flag} disagrees with --init_from" in err and len(err.strip().splitlines()) == 1, err


def test_mistral_without_a_sliding_window_reads_as_llama(tmp_path, small_corpus):
    _, hf = _tiny_llama(tmp_path, small_corpus)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                                                "sliding_window": None}))
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(hf).eval()
    ours = wt_load.load_hf(str(hf))
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13]])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-5)


def test_compressed_parquet_is_read_through_a_temp_file(tmp_path):
    """.parquet.zst (zstd streams cannot seek) and .parquet.gz read like .parquet."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    import gptkit.data.sources  # noqa: F401
    from gptkit.data import local

    pq.write_table(pa.table({"text": ["first document", "second one"]}), tmp_path / "a.parquet")
    raw = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "b.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "c.parquet.gz").write_bytes(gzip.compress(raw))
    for name in ("a.parquet", "b.parquet.zst", "c.parquet.gz"):
        with local.open_data(str(tmp_path / name)) as stream:
            assert list(local._parquet_rows(stream, name, "text", 8)) == [["first document", "second one"]], name


def test_a_refused_pytorch_model_bin_is_one_line(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 32, "n_head": 2,
                                                "n_layer": 1}))
    import pickle

    (hf / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "tensors"}))
    code, _, err = run_cli(wt_load.main, ["from-hf", hf, tmp_path / "o.pt"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pytorch_model.bin is corrupt or not a weights file" in err


def test_the_progress_bar_of_a_resumed_run_shows_the_true_step():
    from types import SimpleNamespace

    from gptkit.loop import Reporter, TrainConfig, TrainState

    state, tcfg = TrainState(), TrainConfig(max_steps=200, progress=True, log_every=0)
    runtime = SimpleNamespace(is_main=True, world_size=1)
    rep = Reporter(runtime, tcfg, state, [], 64, 1.0, None)  # made before the resume, as the Trainer makes it
    state.step = 197  # resumed at 196, this is the first step after it
    rep.step(state, SimpleNamespace(metrics={}, loss=1.0), 1e-3, 0.1)
    assert rep.bar.n == 197
    rep.close()
