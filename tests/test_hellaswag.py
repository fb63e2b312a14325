"""HellaSwag scored exactly as lm-evaluation-harness scores it: its query and choice text, its split
of a context/continuation pair, its truncation, acc and acc_norm; through wt_load.py eval and during
training. (Checked once against lm-eval 0.4.13 itself on an HF export: 300 of 300 items scored alike,
log-likelihoods within 6e-5; here an independent scorer built on transformers stands in for it.)"""

import json

import hellaswag_items
import numpy as np
import pytest
import torch
from conftest import run_cli

import gpt_train as gt
import prep_dataset
import wt_load
from gptkit.evals import hellaswag as hs
from gptkit.evals import scorer


@pytest.fixture(scope="module")
def val_file(tmp_path_factory):
    text = "\n".join(prep_dataset.embedded_books())
    return hellaswag_items.write(tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl", text, 40, seed=1)


def test_query_and_choices_are_lm_evals():
    doc = {"activity_label": "Personal Care and Style", "ctx_a": "[header] How to dye your hair [title] Wash your hair.  "
           "[step] Use a mild shampoo.", "ctx_b": "then rinse it", "label": 0,
           "endings": ["[step] Dry it  well [substeps] with a towel.", " Paint the wall. ", "Call a friend [title] now", "Eat."]}
    item = hs.item_of(doc)
    # strip, " [title]" -> ". ", [...] removed, "  " -> " " once (three spaces become two), ctx_b capitalised
    assert item.query == "Personal Care and Style: How to dye your hair. Wash your hair.  Use a mild shampoo. Then rinse it"
    assert item.choices == [" Dry it well with a towel.", "Paint the wall.", "Call a friend. now", "Eat."]
    assert hs.item_of({**doc, "ctx_b": "ALL CAPS"}).query.endswith(" All caps")  # str.capitalize lowers the rest


def test_a_pair_is_split_as_lm_eval_splits_it():
    tok = gt.get_tokenizer()
    ctx, cont = hs.encode_pair("Paris is the capital of ", "France", tok)  # the trailing space joins the continuation
    assert ctx == tok.encode_ordinary("Paris is the capital of") and cont == tok.encode_ordinary(" France")
    ctx, cont = hs.encode_pair("He said", " hello", tok)
    whole = tok.encode_ordinary("He said hello")
    assert ctx + cont == whole and cont == whole[len(ctx):]
    item = hs.Item("a " * 50, ["b c d"], 0)  # longer than the model's context: the last tokens are kept
    (request,) = hs.requests(item, tok, max_length=8)
    inp, first, targets = scorer.fit(request, 8, "lm-eval")
    cont = request.tokens[request.start:]
    full = tok.encode_ordinary(("a " * 50).strip() + "  b c d")
    assert len(inp) == 8 and inp == full[-9:-1] and targets == cont == full[-len(cont):] and first == 8 - len(cont)


def lm_eval_style(hf_model, hf_tok, item: hs.Item, max_length: int) -> list[float]:
    """lm-eval's HFLM loglikelihood, written out on transformers: its own tokenizer, one request at a time."""
    out = []
    for choice in item.choices:
        context, continuation = item.query, " " + choice
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = hf_tok(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = hf_tok(context, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx):]
        inp = torch.tensor([(ctx + cont)[-(max_length + 1):][:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(inp).logits[0, -len(cont):].float(), dim=-1)
        out.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
    return out


def test_scores_equal_an_lm_eval_style_scorer_on_the_hf_export(val_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = gt.GPTModel(gt.get_config("debug", context_length=48)).eval()  # short: some items are truncated
    hf_dir = wt_load.export_hf(model, tmp_path / "hf")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    items = hs.read_items(val_file)
    ours = hs.score(model, items, "cpu", items_per_batch=3)
    acc, norm = 0, 0
    for item in items:
        theirs = lm_eval_style(hf_model, hf_tok, item, 48)
        mine = [s.logprob for s in scorer.score_requests(model, hs.requests(item, gt.get_tokenizer(), 48), "cpu", 48)]
        assert np.allclose(mine, theirs, atol=1e-4), (mine, theirs)
        judged = hs.judge(item, [scorer.Scored(ll, 0.0, 1, False) for ll in theirs])
        acc, norm = acc + judged["acc"], norm + judged["acc_norm"]
    assert {k: ours[k] for k in ("acc", "acc_norm", "n")} == {"acc": acc / len(items), "acc_norm": norm / len(items),
                                                             "n": len(items)}


def test_wt_load_eval_prints_acc_acc_norm_and_n(val_file, tmp_path, capsys):
    torch.manual_seed(0)
    path = wt_load.save_from_model(gt.GPTModel(gt.get_config("debug")), tmp_path / "m.pt", "test")
    code, out, err = run_cli(wt_load.main, ["eval", path, "--hellaswag", val_file, "--limit", "12", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["n"] == 12 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    model, _ = wt_load.load_ours(path)
    again = hs.score(model, hs.read_items(val_file, 12), "cpu")
    assert {k: result[k] for k in ("acc", "acc_norm", "n")} == {k: again[k] for k in ("acc", "acc_norm", "n")}
    code, out, err = run_cli(wt_load.main, ["eval", path, "--hellaswag", tmp_path / "nope.jsonl"], capsys)
    assert code == 2 and err.startswith("error: --hellaswag") and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.jsonl").write_text('{"ctx_a": "x"}\n')
    code, out, err = run_cli(wt_load.main, ["eval", path, "--hellaswag", tmp_path / "bad.jsonl"], capsys)
    assert code == 2 and "line 1 has no activity_label" in err


def test_training_scores_hellaswag_every_n_steps(val_file, small_corpus, tmp_path):
    import pretraining_advanced as adv

    flags = ["--data", str(small_corpus), "--cache_dir", str(tmp_path / "c"), "--val_fraction", "0.2", "--model", "debug",
             "--batch_size", "4", "--warmup_steps", "2", "--no-progress", "--dtype", "fp32", "--max_steps", "4",
             "--eval_every", "0", "--sample_every", "0", "--run_dir", str(tmp_path / "r"), "--tensorboard",
             "--hellaswag", str(val_file), "--hellaswag_every", "2", "--hellaswag_limit", "10"]
    res = adv.main(flags)
    h = res["history"]
    assert h["hellaswag_step"] == [0, 2, 4] and len(h["hellaswag"]) == len(h["hellaswag_norm"]) == 3
    model, _ = wt_load.load_ours(res["checkpoint"])
    last = hs.score(model, hs.read_items(val_file, 10), "cpu")
    assert (h["hellaswag"][-1], h["hellaswag_norm"][-1]) == (last["acc"], last["acc_norm"])
    log = (tmp_path / "r" / "train.log").read_text()
    assert "eval step 4 | hellaswag " in log and "| hellaswag_norm " in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/hellaswag")] == [0, 2, 4]
    with pytest.raises(gt.UserError, match="--hellaswag_every has no effect without"):
        adv.main([*flags[: flags.index("--hellaswag")], "--hellaswag_every", "2"])


def test_a_bad_hellaswag_file_is_refused_before_the_run_starts(small_corpus, tmp_path):
    import pretraining_advanced as adv

    (tmp_path / "bad.jsonl").write_text('{"ctx_a": "x"}\n')
    for path, fragment in ((tmp_path / "nope.jsonl", "is not a file"), (tmp_path / "bad.jsonl", "has no activity_label")):
        with pytest.raises(gt.UserError, match=fragment):
            adv.main(["--data", str(small_corpus), "--model", "debug", "--max_steps", "2", "--cache_dir",
                      str(tmp_path / "c"), "--run_dir", str(tmp_path / "r"), "--hellaswag", str(path)])
        assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()  # nothing made, nothing tokenized
