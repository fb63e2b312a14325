"""CORE's speed: items per second and the time of a whole pass, on this machine, for a model preset.
Without --bundle it builds a stand-in for the DCLM eval bundle in a temp folder: its 22 tasks with
their real types, few-shot counts, delimiters and item counts, filled with prose from the embedded
books (lengths like the real items'), so a pass costs what the real one would; with --bundle the real
thing is timed.

    python benchmarks/bench_core.py --model small --max_per_task 40
    python benchmarks/bench_core.py --model 124M --max_per_task 8 --dtype bf16
    python benchmarks/bench_core.py --bundle eval_bundle --model 124M     # the real bundle, all items
"""

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from _common import gt, print_table

# (label, type, few-shot, delimiter, items in the real bundle, random baseline %)
TASKS = [("hellaswag_zeroshot", "multiple_choice", 0, " ", 10042, 25), ("jeopardy", "language_modeling", 10, "\nAnswer: ",
         2117, 0), ("bigbench_qa_wikidata", "language_modeling", 10, " ", 20321, 0),
         ("arc_easy", "multiple_choice", 10, "\nAnswer: ", 2376, 25), ("arc_challenge", "multiple_choice", 10,
         "\nAnswer: ", 1172, 25), ("copa", "multiple_choice", 0, " ", 100, 50),
         ("commonsense_qa", "multiple_choice", 10, " ", 1221, 20), ("piqa", "multiple_choice", 10, " ", 1838, 50),
         ("openbook_qa", "multiple_choice", 0, " ", 500, 25), ("lambada_openai", "language_modeling", 0, " ", 5153, 0),
         ("hellaswag", "multiple_choice", 10, " ", 10042, 25), ("winograd", "schema", 0, " ", 273, 50),
         ("winogrande", "schema", 0, " ", 1267, 50), ("bigbench_dyck_languages", "language_modeling", 10, " ", 1000, 0),
         ("agi_eval_lsat_ar", "multiple_choice", 3, " ", 230, 25), ("bigbench_cs_algorithms", "language_modeling", 10,
         " ", 1320, 0), ("bigbench_operators", "language_modeling", 10, " ", 210, 0),
         ("bigbench_repeat_copy_logic", "language_modeling", 10, " ", 32, 0), ("squad", "language_modeling", 10, " ",
         10570, 0), ("coqa", "language_modeling", 0, " ", 7983, 0), ("boolq", "multiple_choice", 10, "\nAnswer: ", 3270,
         62), ("bigbench_language_identification", "multiple_choice", 10, " ", 10000, 25)]


def stand_in_bundle(root: Path, per_task: int) -> Path:
    from gptkit.gutenberg.sources import embedded_books

    words = " ".join(embedded_books()).split()
    rng = random.Random(0)

    def text(n):
        i = rng.randrange(len(words) - n)
        return " ".join(words[i : i + n])

    (root / "eval_data").mkdir(parents=True)
    lines = ["icl_tasks:"]
    for label, kind, shots, delim, _, _ in TASKS:
        rows = []
        for _ in range(max(per_task, shots + 1)):
            if kind == "multiple_choice":
                rows.append({"query": text(rng.randint(15, 60)), "choices": [text(rng.randint(2, 12)) for _ in range(4)],
                             "gold": rng.randrange(4)})
            elif kind == "schema":
                rows.append({"context_options": [text(12), text(12)], "continuation": text(6), "gold": 0})
            else:
                rows.append({"context": text(rng.randint(20, 80)), "continuation": text(rng.randint(1, 4))})
        (root / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines += [f"- label: {label}", f"  dataset_uri: {label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Random baseline"])
        for label, *_, baseline in TASKS:
            w.writerow([label, baseline])
    return root


def main(argv=None) -> dict:
    from gptkit.evals import core

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="size preset")
    p.add_argument("--bundle", type=Path, default=None, help="the real eval bundle (default: a stand-in)")
    p.add_argument("--max_per_task", type=int, default=20, help="items per task")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="precision of the forward pass")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = gt.GPTModel(gt.get_config(a.model)).eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if a.dtype == "bf16" else None
    with tempfile.TemporaryDirectory() as tmp:
        bundle = a.bundle or stand_in_bundle(Path(tmp), a.max_per_task)
        tasks = core.read_bundle(bundle, max_per_task=a.max_per_task)
        t0 = time.perf_counter()
        core.evaluate(model, tasks[:1], "cpu", autocast)  # tokenizing and a warm-up, not timed
        tokenize_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = core.evaluate(model, tasks, "cpu", autocast)
        seconds = time.perf_counter() - t0
    n = sum(len(t.data) for t in tasks)
    full = sum(t[4] for t in TASKS)
    L = model.cfg.context_length
    tokens = sum(len(r.tokens[-L:]) for t in tasks for item in t.tokenized[L] for r in item.requests)
    # An H100 estimate: the forward FLOPs of a full pass (2 x parameters per token, plus attention) at
    # 30% of its 989 TFLOP/s dense bf16 peak (short, padded, small batches: far below training's MFU).
    flops_per_token = 2 * gt.count_parameters(model)["total"] + 2 * 2 * model.cfg.n_layers * model.cfg.emb_dim * L / 2
    h100_s = tokens * (full / n) * flops_per_token / (0.3 * 989e12)
    rows = [{"model": a.model, "dtype": a.dtype, "items": n, "tokens": tokens, "seconds": round(seconds, 1),
             "items/s": round(n / seconds, 1), "full pass here (min)": round(full / (n / seconds) / 60, 1),
             "full pass on an H100 (est. s)": round(h100_s), "core": round(r["core"], 4)}]
    print_table(rows)
    print(f"(tokenizing and a warm-up: {tokenize_s:.1f} s; the full bundle holds {full:,} items)")
    return rows[0]


if __name__ == "__main__":
    main()
