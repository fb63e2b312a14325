"""Tokenizers of one's own: trained here, loaded by the toolkit and by transformers with the same ids,
used by every script (the vocabulary follows the tokenizer, caches store uint16 or uint32 ids, documents
are marked as the tokenizer declares), carried by checkpoints, run folders and exports; and open models
continued with their own tokenizer, with transformers' logits and greedy text."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

import gpt_train as gt
import pretraining_advanced as adv
import pretraining_simple as simple
import token_cache
import tokenizer as tokcli
import wt_load
from gptkit import tokenizer as T

DEBUG = ["--model", "debug", "--batch_size", "4", "--eval_iters", "2", "--no-progress", "--seed", "1",
         "--sample_every", "0", "--log_every", "1", "--dtype", "fp32", "--eval_every", "2"]
TEXT = "It was 1895 -- the year of the great frost -- and Mr. Holmes's room was cold.\n\n\"Quite so,\" said he. 12345"


@pytest.fixture(autouse=True)
def gpt2_again():
    yield
    T.use_tokenizer(None)  # the next test starts with GPT-2's, as a new process does


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe512"
    T.use_tokenizer(None)
    tokcli.main(["train", "--data", str(small_corpus), "--vocab_size", "512", "--out", str(out), "--no-progress",
                 "--doc_chars", "2000"])
    return out


def test_a_trained_tokenizer_encodes_alike_in_the_toolkit_and_in_transformers(trained, small_corpus):
    from transformers import AutoTokenizer

    ours, theirs = T.load_tokenizer(trained), AutoTokenizer.from_pretrained(trained)
    text = (small_corpus / "combined_1.txt").read_text()[:20000] + TEXT
    assert ours.n_vocab == 512 == len(theirs) and ours.documents == "bos" and ours.eot_token == 511
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode_ordinary(text)
    assert theirs(TEXT)["input_ids"][0] == 511  # transformers puts the document token first, as training did
    assert ours.decode(ours.encode_ordinary(TEXT)) == TEXT
    info = tokcli.main(["inspect", str(trained), "--json"])
    assert info["vocab_size"] == 512 and info["special_tokens"] == {"<|bos|>": 511} and info["cache_dtype"] == "uint16"
    assert info["trained_on"]["chars"] > 0 and "\\p{N}{1,2}" in info["pattern"]
    # bits per byte: a special token stands for no text
    assert ours.byte_lengths[511] == 0 and ours.byte_lengths[:256].tolist() == [1] * 256


def test_compare_gives_bytes_per_token_of_each_on_each_text(trained, small_corpus, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 20)
    r = tokcli.main(["compare", "gpt2", str(trained), "--text", str(tmp_path / "t.txt"), "--data", str(small_corpus),
                     "--doc_chars", "2000", "--plot", str(tmp_path / "c.png"), "--json"])
    cell = r["table"][str(trained)][str(tmp_path / "t.txt")]
    assert cell["bytes"] == len((TEXT * 20).encode()) and cell["tokens"] == len(T.load_tokenizer(trained).encode_ordinary(
        TEXT * 20))
    assert len(r["table"]["gpt2"]) == 2 and (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--data", "EMPTY", "--vocab_size", "512", "--out", "OUT"], "holds no text to train on"),
    (["train", "--data", "CORPUS", "--vocab_size", "200", "--out", "OUT"], "cannot hold the 256 bytes, 1 special token"),
    (["train", "--data", "CORPUS", "--vocab_size", "512"], "train needs --out FOLDER"),
    (["inspect", "NOTTOK"], "is not a tokenizer folder (no tokenizer.json)"),
    (["inspect", "MISSING"], "MISSING: no such folder"),
    (["compare", "gpt2"], "compare needs texts"),
])
def test_bad_input_is_one_line(argv, fragment, small_corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "nottok").mkdir()
    names = {"EMPTY": tmp_path / "empty", "CORPUS": small_corpus, "OUT": tmp_path / "out", "NOTTOK": tmp_path / "nottok",
             "MISSING": tmp_path / "MISSING"}
    code, _, err = run_cli(tokcli.main, [str(names.get(a, a)) for a in argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_training_with_a_trained_tokenizer_resumes_exactly_and_carries_it(trained, small_corpus, tmp_path, capsys):
    flags = ["--data_dir", str(small_corpus), *DEBUG, "--tokenizer", str(trained), "--arch", "llama"]
    full = simple.main([*flags, "--max_steps", "4", "--run_dir", str(tmp_path / "full"), "--save_every", "2"])
    part = simple.main([*flags, "--max_steps", "4", "--run_dir", str(tmp_path / "part"), "--resume",
                        str(tmp_path / "full" / "ckpt_00000002.pt")])
    assert part["history"]["train_loss"] == full["history"]["train_loss"]
    ckpt = gt.load_checkpoint(full["checkpoint"])
    assert ckpt["config"]["vocab_size"] == 512 and ckpt["run"]["tokenizer"]["name"] == "bpe512"
    assert (tmp_path / "full" / "tokenizer" / "tokenizer.json").read_text() == (trained / "tokenizer.json").read_text()
    manifest = json.loads((small_corpus / T.default_cache_name() / "manifest.json").read_text())
    assert manifest["tokenizer"] == "bpe512" and manifest["dtype"] == "uint16"
    # A resume with another tokenizer is refused in one line; generate and to-hf use the checkpoint's own
    T.use_tokenizer(None)
    code, _, err = run_cli(simple.main, [*flags[:-4], "--arch", "llama", "--max_steps", "6", "--run_dir",
                                         tmp_path / "full", "--resume", "auto"], capsys)
    assert code == 2 and "trained with tokenizer bpe512" in err and len(err.strip().splitlines()) == 1, err
    text = wt_load.main(["generate", str(full["checkpoint"]), "--prompt", "It was", "--max_new_tokens", "5"])
    assert text.startswith("It was")
    T.use_tokenizer(None)
    code, _, err = run_cli(wt_load.main, ["generate", full["checkpoint"], "--tokenizer", "gpt2"], capsys)
    assert code == 2 and "is not the tokenizer" in err
    hf = wt_load.main(["to-hf", str(full["checkpoint"]), str(tmp_path / "hf")])
    _same_as_transformers(hf, T.load_tokenizer(trained))


def _same_as_transformers(folder, tok):
    """Logits within 1e-5 in fp32 and identical greedy text, in transformers and in the toolkit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([hf_tok(TEXT)["input_ids"][:24]])
    wt_load.use_source_tokenizer(str(folder))
    ours = wt_load.load_any(str(folder)).eval()
    assert gt.get_tokenizer().fingerprint() == tok.fingerprint()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-5
    mine = gt.generate(ours, ids[:, :6], max_new_tokens=10)
    out = theirs.generate(ids[:, :6], max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids[:, :6]),
                          eos_token_id=None, pad_token_id=tok.eot_token)
    assert mine.tolist() == out.tolist() and hf_tok.decode(out[0]) == tok.decode(mine[0].tolist())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_an_open_model_is_continued_with_its_own_tokenizer(arch, trained, small_corpus, tmp_path):
    """A model transformers builds (Llama, Qwen3) with a real tokenizer saved beside it (one trained
    here, as a PreTrainedTokenizerFast): read with its own tokenizer, continued for two steps with no
    model flag, exported; transformers agrees before and after."""
    import transformers

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(trained / "tokenizer.json"), bos_token="<|bos|>",
                                                  eos_token="<|bos|>", pad_token="<|bos|>")
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=511,
              eos_token_id=511, pad_token_id=511)
    config = (transformers.LlamaConfig(**kw) if arch == "llama" else transformers.Qwen3Config(**kw, head_dim=16))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    src = tmp_path / "src"
    model.save_pretrained(src)
    hf_tok.save_pretrained(src)
    tok = T.load_tokenizer(src)
    assert tok.n_vocab == 512 and tok.encode_ordinary(TEXT) == T.load_tokenizer(trained).encode_ordinary(TEXT)
    _same_as_transformers(src, tok)  # before
    T.use_tokenizer(None)
    res = simple.main(["--data_dir", str(small_corpus), *DEBUG[2:], "--init_from", str(src), "--max_steps", "2",
                       "--context_length", "32", "--run_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "c")])
    assert res["state"].step == 2 and gt.load_checkpoint(res["checkpoint"])["config"]["n_kv_heads"] == 2
    out = wt_load.main(["to-hf", str(res["checkpoint"]), str(tmp_path / "after")])
    _same_as_transformers(out, tok)  # after


def test_a_vocabulary_past_65536_ids_is_cached_as_uint32(small_corpus, tmp_path):
    """A Hugging Face tokenizer of 70,000 ids (a word-level one): its cache holds uint32 ids, it trains."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set((small_corpus / "combined_1.txt").read_text().split()))
    names = ["<unk>", "<|endoftext|>", *words]
    names += [f"unused{i}" for i in range(70_000 - len(names))]
    vocab = {w: i for i, w in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "words"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "unk_token": "<unk>"}))
    m = token_cache.main(["build", "--data", str(small_corpus), "--cache_dir", str(tmp_path / "c"), "--tokenizer",
                          str(folder), "--no-progress", "--val_fraction", "0.2"])
    assert m["dtype"] == "uint32" and m["tokenizer"] == "words"
    shard = np.fromfile(tmp_path / "c" / m["shards"]["train"][0]["name"], dtype=np.uint32)
    assert shard.max() < 70_000 and (shard == 1).sum() >= 1  # the end-of-text token follows the document
    r = adv.main(["--data", str(small_corpus), "--cache_dir", str(tmp_path / "c"), "--val_fraction", "0.2",
                  "--tokenizer", str(folder), *DEBUG, "--max_steps", "2", "--run_dir", str(tmp_path / "r")])
    assert r["state"].step == 2 and np.isfinite(r["history"]["val_bpb"][-1])


def test_documents_are_marked_as_the_tokenizer_declares(trained):
    bos = T.load_tokenizer(trained)
    ids = T.encode_rows(["one<|endoftext|>two", T.Piece("three", closes=False), T.Piece(" four", opens=False)], bos)
    assert [a.tolist()[0] for a in ids] == [511, 511, bos.encode_ordinary(" four")[0]]
    assert ids[0].tolist().count(511) == 2 and 511 not in ids[2].tolist()
    gpt2 = T.gpt2()
    ids = T.encode_rows(["one<|endoftext|>two", T.Piece("three", closes=False), T.Piece(" four", opens=False)], gpt2)
    assert ids[0].tolist()[-1] == 50256 and ids[1].tolist()[-1] != 50256 and ids[2].tolist()[-1] == 50256
    from gptkit.evals import core

    T.use_tokenizer(bos)
    task = core.Task("t", "language_modeling", 0, " ", 0.0, [{"context": "It was", "continuation": "cold"}], None)
    assert core.requests(task, 0, bos, 64)[0].tokens[0] == 511  # CORE as nanochat: BOS first
    assert gt.text_to_token_ids("It was", bos)[0, 0].item() == 511


def test_a_tokenizer_backend_from_a_plugin_is_carried_by_its_checkpoints(small_corpus, tmp_path, capsys):
    """examples/plugins/bytes_tokenizer.py, written from DESIGN.md alone: it trains, its checkpoint
    carries it (its own file and its backend's name), and reading that checkpoint needs the plugin."""
    from conftest import ROOT

    plugin = ["--plugin", str(ROOT / "examples" / "plugins" / "bytes_tokenizer.py")]
    folder = tmp_path / "bytes"
    folder.mkdir()
    (folder / "bytes_tokenizer.json").write_text('{"name": "bytes"}')
    res = simple.main([*plugin, "--tokenizer", str(folder), "--data_dir", str(small_corpus), *DEBUG, "--max_steps", "2",
                       "--run_dir", str(tmp_path / "r"), "--cache_dir", str(tmp_path / "c")])
    record = gt.load_checkpoint(res["checkpoint"])["run"]["tokenizer"]
    assert record["backend"] == "bytes" and record["files"] == {"bytes_tokenizer.json": '{"name": "bytes"}'}
    assert gt.load_checkpoint(res["checkpoint"])["config"]["vocab_size"] == 257
    assert wt_load.main([*plugin, "generate", str(res["checkpoint"]), "--prompt", "It", "--max_new_tokens", "3"]).startswith("It")
