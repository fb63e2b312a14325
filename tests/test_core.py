"""CORE, scored as nanochat scores it. The reference below is nanochat's core_eval.py rules written out
independently of the toolkit (its jinja templates, its tokenizing with the beginning token, its
common-prefix/suffix rule, its cropping, its one forward pass per item), run on the same model: every
task's every item must agree. Bundles are built here in the eval bundle's format from real prose."""

import csv
import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_cli

import gpt_train as gt
import prep_dataset
import wt_load
from gptkit.evals import core

# ----------------------------------------------------------------------------------------------
# A bundle in the DCLM eval bundle's format


def _sentences(n: int) -> list[str]:
    text = " ".join(prep_dataset.embedded_books()[1].split())
    out = [s.strip() for s in text.split(". ") if 60 <= len(s.strip()) <= 220]
    return out[:n]


def make_bundle(root, n_items: int = 14, fewshot=(3, 0, 2, 1), long_item: bool = True):
    """Four tasks: multiple choice (3-shot, a delimiter with a newline), schema (0-shot), language
    modelling (2-shot, contexts with trailing whitespace), multiple choice whose choices share their
    first words (1-shot). One item far longer than any model context."""
    rng = random.Random(7)
    sents = _sentences(400)
    data = root / "eval_data"
    (data / "reading").mkdir(parents=True, exist_ok=True)
    mc, schema, lm, shared = [], [], [], []
    for i in range(n_items):
        s = sents[i].split()
        cut = len(s) // 2
        others = [" ".join(sents[rng.randrange(100, 400)].split()[cut:]) for _ in range(3)]
        gold = rng.randrange(4)
        mc.append({"query": " ".join(s[:cut]), "choices": others[:gold] + [" ".join(s[cut:])] + others[gold:],
                   "gold": gold})
        options = [" ".join(sents[j].split()[:cut]) for j in (i, i + 150, i + 250)]
        schema.append({"context_options": options, "continuation": " ".join(s[cut:]), "gold": 0})
        lm.append({"context": " ".join(s[:-1]) + ("  " if i % 2 else ""), "continuation": s[-1]})
        shared.append({"query": "Which way? " + " ".join(s[:cut]), "choices": [f"the {w} road" for w in
                                                                             ("old", "new", "long")], "gold": i % 3})
    if long_item:
        mc[3]["query"] = " ".join(sents[200:260])  # thousands of tokens: cropped to the context
    files = {"mc.jsonl": mc, "schema.jsonl": schema, "reading/lm.jsonl": lm, "shared.jsonl": shared}
    for name, rows in files.items():
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = [("mc_task", "multiple_choice", "mc.jsonl", fewshot[0], "\nAnswer:"),
             ("schema_task", "schema", "schema.jsonl", fewshot[1], None),
             ("lm_task", "language_modeling", "reading/lm.jsonl", fewshot[2], " "),
             ("shared_prefix", "multiple_choice", "shared.jsonl", fewshot[3], " ")]
    lines = ["icl_tasks:"]
    for label, kind, uri, shots, delim in tasks:
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]", f"  icl_task_type: {kind}"]
        if delim is not None:
            lines.append(f"  continuation_delimiter: {json.dumps(delim)}")
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline", "Centered Metric?"])
        for label, baseline in (("mc_task", 25), ("schema_task", 50), ("lm_task", 0), ("shared_prefix", 33.3),
                                ("unused", 10)):
            w.writerow([label, "x", "x", 0, n_items, baseline, "Yes"])
    return root


# ----------------------------------------------------------------------------------------------
# nanochat's rules, written out


def reference_task(model, task_cfg: dict, data: list, max_seq_len: int) -> list[bool]:
    from jinja2 import Template

    mc = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()
    schema = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()
    lm = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()
    tok = gt.get_tokenizer()

    def encode(texts):
        return [[50256] + tok.encode_ordinary(t) for t in texts]

    def common(seqs, direction):
        n = min(len(s) for s in seqs)
        idx = range(n) if direction == "left" else range(-1, -n - 1, -1)
        for i, k in enumerate(idx):
            if not all(s[k] == seqs[0][k] for s in seqs):
                return i
        return n

    out = []
    for idx, item in enumerate(data):
        shots = []
        if task_cfg["num_fewshot"] > 0:
            rng = random.Random(1234 + idx)
            shots = [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], task_cfg["num_fewshot"])]
        ctx = {"fewshot_examples": shots, "continuation_delimiter": task_cfg["continuation_delimiter"], "item": item}
        kind = task_cfg["task_type"]
        if kind == "multiple_choice":
            tokens = encode([Template(mc).render(choice=c, **ctx) for c in item["choices"]])
            s = common(tokens, "left")
            starts, ends = [s] * len(tokens), [len(t) for t in tokens]
        elif kind == "schema":
            tokens = encode([Template(schema).render(context=c, **ctx) for c in item["context_options"]])
            suffix = common(tokens, "right")
            ends = [len(t) for t in tokens]
            starts = [e - suffix for e in ends]
        else:
            without = Template(lm).render(include_continuation=False, **ctx).strip()
            with_ = Template(lm).render(include_continuation=True, **ctx)
            t_without, t_with = encode([without, with_])
            tokens, starts, ends = [t_with], [len(t_without)], [len(t_with)]
        crops = [max(0, len(t) - max_seq_len) for t in tokens]
        tokens = [t[-max_seq_len:] for t in tokens]
        starts = [s - c for s, c in zip(starts, crops)]
        ends = [e - c for e, c in zip(ends, crops)]
        width = max(len(t) for t in tokens)
        ids = torch.full((len(tokens), width), 50256, dtype=torch.long)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.tensor(t)
        with torch.no_grad():
            logits = model(ids)
        losses = F.cross_entropy(logits.view(-1, logits.size(-1)), torch.roll(ids, -1, 1).view(-1),
                                 reduction="none").view(ids.shape)
        if kind == "language_modeling":
            out.append(bool(torch.all(logits.argmax(-1)[0, starts[0] - 1 : ends[0] - 1] == ids[0, starts[0] : ends[0]])))
        else:
            means = [losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
            out.append(means.index(min(means)) == item["gold"])
    return out


def reference(model, bundle, max_per_task=None, max_seq_len=32) -> dict:
    import yaml

    config = yaml.safe_load((bundle / "core.yaml").read_text())
    baselines = {r["Eval Task"]: float(r["Random baseline"]) for r in csv.DictReader(open(bundle / "eval_meta_data.csv"))}
    results = {}
    for t in config["icl_tasks"]:
        data = [json.loads(ln) for ln in (bundle / "eval_data" / t["dataset_uri"]).read_text().splitlines()]
        random.Random(1337).shuffle(data)
        data = data[:max_per_task] if max_per_task else data
        meta = {"task_type": t["icl_task_type"], "num_fewshot": t["num_fewshot"][0],
                "continuation_delimiter": t.get("continuation_delimiter", " ")}
        right = reference_task(model, meta, data, max_seq_len)
        acc = sum(right) / len(right)
        b = baselines[t["label"]]
        results[t["label"]] = {"per_item": right, "accuracy": acc, "centered": (acc - 0.01 * b) / (1 - 0.01 * b)}
    return {"tasks": results, "core": sum(r["centered"] for r in results.values()) / len(results)}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("eval_bundle"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    """A briefly trained debug model (context 32), so choices are not all alike."""
    import pretraining_simple as simple

    run = tmp_path_factory.mktemp("core_run")
    res = simple.main(["--data_dir", str(small_corpus), "--debug", "--max_steps", "30", "--no-progress", "--run_dir",
                       str(run), "--lr", "3e-3", "--eval_every", "0", "--sample_every", "0", "--dtype", "fp32"])
    return res["checkpoint"]


# ----------------------------------------------------------------------------------------------


def test_every_item_is_scored_as_nanochat_scores_it(bundle, trained, max_per_task=9):
    model, _ = wt_load.load_ours(trained)
    ours = core.evaluate(model, core.read_bundle(bundle, max_per_task=max_per_task), "cpu")
    ref = reference(model, bundle, max_per_task)
    assert set(ours["tasks"]) == set(ref["tasks"]) == {"mc_task", "schema_task", "lm_task", "shared_prefix"}
    for label, r in ref["tasks"].items():
        assert [bool(v) for v in ours["tasks"][label]["per_item"]] == r["per_item"], label
        assert ours["tasks"][label]["accuracy"] == pytest.approx(r["accuracy"], abs=1e-12)
        assert ours["tasks"][label]["centered"] == pytest.approx(r["centered"], abs=1e-12)
    assert ours["core"] == pytest.approx(ref["core"], abs=1e-12)
    assert 0 < sum(sum(t["per_item"]) for t in ref["tasks"].values())  # the test can fail: some items are right


def test_the_rules_behind_the_score(bundle):
    tasks = {t.label: t for t in core.read_bundle(bundle)}
    mc = tasks["mc_task"]
    order = json.loads("[" + ",".join((bundle / "eval_data" / "mc.jsonl").read_text().splitlines()) + "]")
    random.Random(1337).shuffle(order)
    assert mc.data == order and mc.baseline == 0.25 and mc.delimiter == "\nAnswer:" and mc.fewshot == 3
    shots = core.fewshot_of(mc, 5)
    expected = [mc.data[j] for j in random.Random(1239).sample([j for j in range(len(mc.data)) if j != 5], 3)]
    assert shots == expected and mc.data[5] not in shots
    first = core.prompts(mc, 5)[0]
    assert first.startswith(f"{shots[0]['query']}\nAnswer:{shots[0]['choices'][shots[0]['gold']]}\n\n")
    lm = tasks["lm_task"]
    without, with_ = core.prompts(lm, 1)
    assert not without.endswith(" ") and with_.startswith(without) and with_.endswith(lm.data[1]["continuation"])
    tok = gt.get_tokenizer()
    reqs = core.requests(tasks["shared_prefix"], 0, tok, 1 << 20)
    assert reqs[0].start == len([50256] + tok.encode_ordinary(core.prompts(tasks["shared_prefix"], 0)[0])) - 2
    assert core.centered(0.25, 0.25) == 0 and core.centered(1.0, 0.25) == 1


def test_one_and_two_ranks_give_the_same_value(bundle, trained, tmp_path):
    script = tmp_path / "two.py"
    script.write_text(
        "import json, os, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import wt_load\nfrom gptkit.evals import core\n"
        "dist.init_process_group('gloo')\n"
        f"model, _ = wt_load.load_ours({str(trained)!r})\n"
        f"r = core.evaluate(model, core.read_bundle({str(bundle)!r}), 'cpu', rank=dist.get_rank(), "
        "world_size=dist.get_world_size(), tokens_per_pass=256)\n"
        f"if dist.get_rank() == 0: open({str(tmp_path / 'two.json')!r}, 'w').write(json.dumps(r))\n"
        "dist.destroy_process_group()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    model, _ = wt_load.load_ours(trained)
    one = core.evaluate(model, core.read_bundle(bundle), "cpu")
    assert two["core"] == one["core"] and {k: v["per_item"] for k, v in two["tasks"].items()} == {
        k: v["per_item"] for k, v in one["tasks"].items()}


def test_wt_load_eval_prints_each_task_and_core(bundle, trained, capsys):
    code, out, err = run_cli(wt_load.main, ["eval", trained, "--core", bundle, "--tasks", "mc_task,lm_task",
                                            "--max_per_task", "6"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("mc_task ") and " centered " in lines[0] and lines[-1].startswith("CORE ")
    code, out, _ = run_cli(wt_load.main, ["eval", trained, "--core", bundle, "--max_per_task", "6", "--json"], capsys)
    r = json.loads(out)["core"]
    assert code == 0 and set(r["tasks"]) == {"mc_task", "schema_task", "lm_task", "shared_prefix"}
    assert r["tasks"]["mc_task"]["n"] == 6 and "items_per_sec" in r


def _bad(bundle, tmp_path, edit):
    import shutil

    b = tmp_path / "bad_bundle"
    if b.exists():
        shutil.rmtree(b)
    shutil.copytree(bundle, b)
    edit(b)
    return b


@pytest.mark.parametrize("edit,fragment", [
    (lambda b: (b / "core.yaml").unlink(), "no core.yaml there"),
    (lambda b: (b / "eval_data" / "schema.jsonl").unlink(), "schema.jsonl is missing: task schema_task's data"),
    (lambda b: (b / "core.yaml").write_text((b / "core.yaml").read_text().replace("icl_task_type: schema",
                                                                                  "icl_task_type: ranking")),
     "icl_task_type 'ranking' is not one of"),
    (lambda b: (b / "eval_data" / "mc.jsonl").write_text((b / "eval_data" / "mc.jsonl").read_text().replace(
        '"gold": 0', '"gold": 7', 1)), "mc.jsonl line"),
    (lambda b: (b / "core.yaml").write_text((b / "core.yaml").read_text().replace("num_fewshot: [3]",
                                                                                  "num_fewshot: [30]")),
     "30 few-shot examples need 31 items, it has 14"),
    (lambda b: (b / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc_task,25\n"),
     "no random baseline for task 'schema_task'"),
    (lambda b: (b / "eval_data" / "reading" / "lm.jsonl").write_text('{"context": null, "continuation": "x"}\n'),
     "lm.jsonl line 1: context must be text for a language_modeling task, got null"),
    # Right answers or one line on malformed bundles: a label used twice (CORE would average the wrong entries)
    (lambda b: (b / "core.yaml").write_text((b / "core.yaml").read_text().replace("label: schema_task",
                                                                                  "label: mc_task")),
     "the label 'mc_task' is taken by an earlier task"),
    # dataset_uri is confined to the bundle: a relative escape, an absolute path, a link that points out
    (lambda b: (b / "core.yaml").write_text((b / "core.yaml").read_text().replace("dataset_uri: mc.jsonl",
                                                                                  "dataset_uri: ../../mc.jsonl")),
     "dataset_uri '../../mc.jsonl' points outside the bundle's eval_data folder"),
    (lambda b: (b / "core.yaml").write_text((b / "core.yaml").read_text().replace(
        "dataset_uri: mc.jsonl", f"dataset_uri: {b / 'eval_data' / 'mc.jsonl'}")), "points outside the bundle"),
    (lambda b: ((b / "eval_data" / "mc.jsonl").unlink(), (b / "eval_data" / "mc.jsonl").symlink_to(b.parent / "x")),
     "points outside the bundle"),
    # A language-modelling item with a gold index (and no choices) is read as what it is
    (lambda b: (b / "eval_data" / "reading" / "lm.jsonl").write_text('{"context": "a", "continuation": "b", "gold": 0}\n'),
     "2 few-shot examples need 3 items, it has 1"),
    # Memory bounded by what the model sees: a line far longer than any item, a file larger than any task
    (lambda b: (b / "eval_data" / "mc.jsonl").write_text('{"query": "' + "x" * (5 << 20) + '"}\n'),
     "mc.jsonl line 1 is longer than 4 Mi characters"),
    (lambda b: (b / "eval_data" / "mc.jsonl").open("wb").truncate(3 << 30), "mc.jsonl is larger than 256 MiB"),
    # core.yaml is a settings file: no YAML aliases (a few lines that expand to gigabytes), a size cap
    (lambda b: (b / "core.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\n"
                                            "icl_tasks: [*b, *b, *b, *b, *b, *b, *b, *b]\n"),
     "aliases (*name) are not accepted"),
    (lambda b: (b / "core.yaml").write_text("# " + "x" * (2 << 20) + "\n"), "core.yaml is larger than 1 MiB"),
])
def test_a_malformed_bundle_is_one_line_before_any_model_work(bundle, tmp_path, capsys, edit, fragment):
    bad = _bad(bundle, tmp_path, edit)
    code, _, err = run_cli(wt_load.main, ["eval", tmp_path / "no_model.pt", "--core", bad], capsys)  # no model needed
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize("field,value,fragment", [
    ("label", "two", "label 'two' is not a whole number"),
    ("ctx_b", None, "ctx_b is null, not text"),
    ("endings", "abcd", "endings is a str, not a list of texts"),
    ("endings", ["a", 3], "endings is a list with non-text entries"),
])
def test_a_malformed_hellaswag_item_is_one_line(tmp_path, capsys, field, value, fragment):
    good = {"activity_label": "x", "ctx_a": "a b", "ctx_b": "c", "endings": ["d", "e", "f", "g"], "label": 1}
    (tmp_path / "hs.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    code, _, err = run_cli(wt_load.main, ["eval", tmp_path / "none.pt", "--hellaswag", tmp_path / "hs.jsonl"], capsys)
    assert code == 2 and f"hs.jsonl line 2: {fragment}" in err and len(err.strip().splitlines()) == 1, err


def test_a_huge_field_costs_what_the_model_sees_only(tmp_path, trained):
    """One HellaSwag item whose ctx_a is 30 MB: read, truncated to its last tokens, scored; the process
    stays far from the gigabytes the whole field would take as tokens."""
    doc = {"activity_label": "x", "ctx_a": "word " * 6_000_000, "ctx_b": "and then", "endings": ["a", "b", "c", "d"],
           "label": 1}
    (tmp_path / "huge.jsonl").write_text(json.dumps(doc) + "\n")
    code = (f"import resource, sys; sys.path.insert(0, {str(ROOT)!r}); import wt_load\n"
            f"r = wt_load.main(['eval', {str(trained)!r}, '--hellaswag', {str(tmp_path / 'huge.jsonl')!r}, '--json'])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, r['n'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_mb, n = map(int, r.stdout.strip().splitlines()[-1].split())
    assert n == 1 and peak_mb < 1200, peak_mb


def test_core_in_training_is_logged_and_goes_into_the_model_card(bundle, small_corpus, tmp_path):
    import pretraining_advanced as adv

    flags = ["--data", str(small_corpus), "--cache_dir", str(tmp_path / "c"), "--val_fraction", "0.2", "--model", "debug",
             "--batch_size", "4", "--no-progress", "--dtype", "fp32", "--max_steps", "4", "--eval_every", "0",
             "--sample_every", "0", "--run_dir", str(tmp_path / "r"), "--tensorboard", "--core", str(bundle),
             "--core_every", "2", "--core_max_per_task", "5"]
    res = adv.main(flags)
    h = res["history"]
    assert h["core_step"] == [0, 2, 4] and len(h["core"]) == 3 and len(h["core/lm_task"]) == 3
    model, ckpt = wt_load.load_ours(res["checkpoint"])
    last = core.evaluate(model, core.read_bundle(bundle, max_per_task=5), "cpu")
    assert h["core"][-1] == last["core"] and h["core/mc_task"][-1] == last["tasks"]["mc_task"]["centered"]
    assert "eval step 4 | core " in (tmp_path / "r" / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/core")] == [0, 2, 4] and "eval/core/schema_task" in acc.Tags()["scalars"]
    card = wt_load.model_card(model.cfg, ckpt, "x")
    assert f"| final CORE | {h['core'][-1]:.4f} |" in card
    with pytest.raises(gt.UserError, match="--core_every has no effect without"):
        adv.main([*flags[: flags.index("--core")], "--core_every", "2"])
