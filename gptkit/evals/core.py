"""CORE: the DCLM paper's score (Li et al. 2024), the mean centered accuracy over the in-context tasks of
its eval bundle (HellaSwag, ARC, PIQA, LAMBADA, Winograd, BoolQ, COPA, Jeopardy, SQuAD and more),
scored exactly as nanochat's CORE evaluation scores it, so the numbers compare with the GPT-2 and
speedrun figures published with it (GPT-2 1.5B: 0.2565):

- the bundle: core.yaml (`icl_tasks`: label, icl_task_type, dataset_uri, num_fewshot, optional
  continuation_delimiter, default " "), eval_data/<dataset_uri> (JSON lines), eval_meta_data.csv
  ("Eval Task", "Random baseline" in percent);
- each task's items shuffled by random.Random(1337), then the first --max_per_task kept;
- few-shot examples per item: random.Random(1234 + i).sample of the other kept items;
- prompts rendered as nanochat's templates render them: each example "query, delimiter, answer" then a
  blank line; for language modelling the contexts stripped, and the prompt without the continuation
  stripped too;
- the document token prepended (GPT-2's <|endoftext|>; a BOS tokenizer's BOS), each prompt tokenized
  whole; the continuation of a multiple-choice item
  starts where its choices' tokens first differ, of a schema item where their common ending begins, of
  a language-modelling item after the prompt without it;
- longer than the model's context: the last context_length tokens are kept;
- multiple choice and schema: the choice with the lowest mean loss over its continuation tokens wins
  (the first on a tie); language modelling: right only if greedy decoding gives every continuation token;
- per task the centered accuracy (acc - b) / (1 - b) with b the random baseline as a fraction, and
  CORE the mean over the tasks that ran.

The bundle cannot be downloaded from this machine; the README says where it comes from.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from gptkit.config import at_least, read_settings_file, setting
from gptkit.errors import UserError, excerpt
from gptkit.evals import EvalSpec, register_eval, scorer
from gptkit.tokenizer import get_tokenizer

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TYPES = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": (("query", str), ("choices", list), ("gold", int)),
          "schema": (("context_options", list), ("continuation", str), ("gold", int)),
          "language_modeling": (("context", str), ("continuation", str))}
# Memory goes to what the model sees: a task file is at most MAX_TASK_FILE bytes and an item (a line) at
# most MAX_ITEM_LINE characters (the real bundle's largest task is a few MB, its longest item a few KB).
MAX_TASK_FILE = 256 << 20
MAX_ITEM_LINE = 4 << 20


@dataclass
class CoreConfig:
    core: Path | None = setting(None, "the DCLM eval bundle (a folder with core.yaml, eval_data/ and "
                                      "eval_meta_data.csv): score CORE, logged as eval/core and eval/core/TASK "
                                      "(each task's centered accuracy)")
    every: int = setting(0, "CORE every N steps (0: only at the end)", check=(at_least(0), ">= 0"))
    max_per_task: int | None = setting(12, "items per task, after each task's seeded shuffle (12: the fewest the 10-shot "
                                           "tasks take; about 5%% of the README main job's time on a 2-core CPU)",
                                       check=(at_least(1), "at least 1"))
    tasks: str | None = setting(None, "comma-separated task labels to run (default: all of the bundle's)")


@dataclass
class Task:
    label: str
    kind: str
    fewshot: int
    delimiter: str
    baseline: float  # the random baseline, a fraction
    data: list[dict]  # the items kept, in the seeded order
    path: Path
    tokenized: dict = field(default_factory=dict)  # {context length: scorer items}


# ----------------------------------------------------------------------------------------------
# Reading and checking a bundle


def read_bundle(bundle, labels: str | None = None, max_per_task: int | None = None) -> list[Task]:
    """The bundle's tasks, checked before any model work: one error line naming the file (and line)."""
    root = Path(bundle)
    root = root.parent if root.is_file() else root
    if not (root / "core.yaml").is_file():
        raise UserError(f"--core {bundle}: no core.yaml there; get the DCLM eval bundle from {BUNDLE_URL} (unzip it "
                        "and give the eval_bundle folder)")
    entries = _task_list(root / "core.yaml")
    baselines = _baselines(root / "eval_meta_data.csv")
    wanted = [t.strip() for t in labels.split(",") if t.strip()] if labels else None
    known = [e["label"] for e in entries]
    unknown = [t for t in wanted or () if t not in known]
    if unknown:
        raise UserError(f"--tasks: {unknown[0]!r} is not a task of {root / 'core.yaml'} (it has {', '.join(known)})")
    tasks = []
    for e in entries:
        if wanted and e["label"] not in wanted:
            continue
        if e["label"] not in baselines:
            raise UserError(f"{root / 'eval_meta_data.csv'} has no random baseline for task {e['label']!r}")
        tasks.append(_task(root, e, baselines[e["label"]], max_per_task))
    if not tasks:
        raise UserError(f"{root / 'core.yaml'} lists no tasks")
    return tasks


def _task_list(path: Path) -> list[dict]:
    config = read_settings_file(path, str(path))  # size-capped, no YAML aliases
    tasks = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, list):
        raise UserError(f"{path} has no icl_tasks list; is it the eval bundle's core.yaml?")
    out, seen = [], set()
    for i, t in enumerate(tasks, 1):
        where = f"{path} task {i}"
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("label", "dataset_uri")):
            raise UserError(f"{where}: needs a label and a dataset_uri")
        if t.get("icl_task_type") not in TYPES:
            raise UserError(f"{where} ({excerpt(t['label'])}): icl_task_type {t.get('icl_task_type')!r} is not one of "
                            f"{', '.join(TYPES)}")
        shots = t.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) and shots else shots
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise UserError(f"{where} ({excerpt(t['label'])}): num_fewshot {t.get('num_fewshot')!r} is not a whole number >= 0")
        delimiter = t.get("continuation_delimiter", " ")
        if not isinstance(delimiter, str):
            raise UserError(f"{where} ({excerpt(t['label'])}): continuation_delimiter must be text")
        if t["label"] in seen:
            raise UserError(f"{where}: the label {excerpt(t['label'])} is taken by an earlier task; each task needs its "
                            "own (CORE averages the tasks by label)")
        seen.add(t["label"])
        out.append({"label": t["label"], "kind": t["icl_task_type"], "uri": t["dataset_uri"], "fewshot": shots,
                    "delimiter": delimiter})
    return out


def _baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise UserError(f"{path} is missing: the eval bundle's random baselines (eval_meta_data.csv)")
    out = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or []):
            raise UserError(f"{path} has no 'Eval Task' and 'Random baseline' columns")
        for lineno, row in enumerate(reader, 2):
            try:
                value = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise UserError(f"{path} line {lineno}: random baseline {row['Random baseline']!r} is not a number")
            if not 0 <= value < 100:
                raise UserError(f"{path} line {lineno}: random baseline {value} is not a percentage below 100")
            out[row["Eval Task"]] = value / 100
    return out


def _task_file(root: Path, e: dict) -> Path:
    """A task's data file: inside the bundle's eval_data folder (where it points too, if a link), a file
    of at most MAX_TASK_FILE bytes."""
    uri, data_dir = e["uri"], root / "eval_data"
    path = data_dir / uri
    inside = not Path(uri).is_absolute() and ".." not in Path(uri).parts
    if not inside or not path.resolve().is_relative_to(data_dir.resolve()):
        raise UserError(f"{root / 'core.yaml'}: task {e['label']}'s dataset_uri {excerpt(uri)} points outside the "
                        f"bundle's eval_data folder; a bundle reads only its own files")
    if not path.is_file():
        raise UserError(f"{path} is missing: task {e['label']}'s data (dataset_uri {e['uri']} in core.yaml)")
    if path.stat().st_size > MAX_TASK_FILE:
        raise UserError(f"{path} is larger than {MAX_TASK_FILE >> 20} MiB, far larger than any task of the DCLM bundle; "
                        "is it the right file?")
    return path


def _task(root: Path, e: dict, baseline: float, max_per_task: int | None) -> Task:
    path = _task_file(root, e)
    data = _items(path, e["kind"])
    random.Random(1337).shuffle(data)
    if max_per_task:
        data = data[:max_per_task]
    if e["fewshot"] > len(data) - 1:
        raise UserError(f"task {e['label']}: {e['fewshot']} few-shot examples need {e['fewshot'] + 1} items, it has "
                        f"{len(data)} ({path}{'' if not max_per_task else ', after --max_per_task'}); raise "
                        "--max_per_task or drop the task")
    return Task(e["label"], e["kind"], e["fewshot"], e["delimiter"], baseline, data, path)


def _items(path: Path, kind: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        try:
            lineno = 0
            while line := f.readline(MAX_ITEM_LINE + 1):
                lineno += 1
                if len(line) > MAX_ITEM_LINE:
                    raise UserError(f"{path} line {lineno} is longer than {MAX_ITEM_LINE >> 20} Mi characters; an item "
                                    "of the DCLM bundle is a few KB: is it the right file?")
                if line.strip():
                    out.append(_item(line, path, lineno, kind))
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start} after line {len(out)})")
    if not out:
        raise UserError(f"{path} holds no items")
    return out


def _item(line: str, path: Path, lineno: int, kind: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg})")
    if not isinstance(item, dict):
        raise UserError(f"{path} line {lineno} is not a JSON object")
    for name, kind_of in FIELDS[kind]:
        value = item.get(name)
        ok = isinstance(value, kind_of) and not isinstance(value, bool)
        if not ok or (kind_of is list and not (value and all(isinstance(v, str) for v in value))):
            what = {str: "text", list: "a non-empty list of texts", int: "a whole number"}[kind_of]
            raise UserError(f"{path} line {lineno}: {name} must be {what} for a {kind} task, got {_show(value)}")
    options = item.get("choices", item.get("context_options")) if kind != "language_modeling" else None
    if options is not None and not 0 <= item["gold"] < len(options):
        raise UserError(f"{path} line {lineno}: gold {item['gold']} is out of range for its {len(options)} options")
    return item


def _show(v) -> str:
    return "null" if v is None else repr(v)[:60]


# ----------------------------------------------------------------------------------------------
# Prompts, as nanochat's templates render them


def fewshot_of(task: Task, i: int) -> list[dict]:
    if task.fewshot == 0:
        return []
    rng = random.Random(1234 + i)
    return [task.data[j] for j in rng.sample([j for j in range(len(task.data)) if j != i], task.fewshot)]


def prompts(task: Task, i: int) -> list[str]:
    item, shots, d = task.data[i], fewshot_of(task, i), task.delimiter
    if task.kind == "multiple_choice":
        head = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    if task.kind == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in shots)
        return [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]]
    head = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in shots)
    return [f"{head}{item['context'].strip()}{d}".strip(), f"{head}{item['context'].strip()}{d}{item['continuation']}"]


def _common(seqs: list[list[int]], from_end: bool) -> int:
    """The length of the tokens every sequence shares at its start (or end)."""
    n = min(len(s) for s in seqs)
    for k in range(n):
        idx = -1 - k if from_end else k
        if any(s[idx] != seqs[0][idx] for s in seqs):
            return k
    return n


def requests(task: Task, i: int, tokenizer, max_length: int) -> list[scorer.Request]:
    texts = scorer.tails(prompts(task, i), max_length)  # a huge field costs what the model will see only
    tokens = [[tokenizer.eot_token] + tokenizer.encode_ordinary(t) for t in texts]  # the document token first
    if task.kind == "multiple_choice":
        start = _common(tokens, from_end=False)
        return [scorer.Request(t, start) for t in tokens]
    if task.kind == "schema":
        suffix = _common(tokens, from_end=True)
        return [scorer.Request(t, len(t) - suffix) for t in tokens]
    without, with_ = tokens
    if with_[: len(without)] != without or len(with_) <= len(without):
        raise UserError(f"{task.path}: item {i} of task {task.label} (after the shuffle): its prompt without the "
                        "continuation does not tokenize as a prefix of the prompt with it")
    return [scorer.Request(with_, len(without))]


def judge(task: Task, i: int, scored: list[scorer.Scored]) -> dict[str, float]:
    if task.kind == "language_modeling":
        right = scored[0].greedy
    else:
        losses = [s.mean_loss for s in scored]
        right = losses.index(min(losses)) == task.data[i]["gold"]  # Python's min: the first on a tie
    return {task.label: float(right)}


def task_items(task: Task, tokenizer, max_length: int) -> list[scorer.Item]:
    return [scorer.Item(requests(task, i, tokenizer, max_length), lambda s, i=i: judge(task, i, s))
            for i in range(len(task.data))]


# ----------------------------------------------------------------------------------------------
# Scoring


def centered(acc: float, baseline: float) -> float:
    return (acc - baseline) / (1 - baseline)


def evaluate(model, tasks: list[Task], device, autocast=None, rank: int = 0, world_size: int = 1,
             max_length: int | None = None, tokens_per_pass: int = 4096) -> dict:
    """{"core": CORE, "tasks": {label: {"accuracy", "centered", "n", "per_item"}}}, on the shared scorer
    (nanochat's truncation), each task's items split across the ranks. The items are tokenized once
    per task and context length (an evaluation every N steps does not tokenize them again)."""
    from gptkit.model import unwrap_model

    max_length = max_length or unwrap_model(model).cfg.context_length
    out = {}
    for task in tasks:
        items = task.tokenized.get(max_length)
        if items is None:
            items = task.tokenized[max_length] = task_items(task, get_tokenizer(), max_length)
        r = scorer.score(model, items, device, autocast, rank, world_size, max_length, window="nanochat",
                         tokens_per_pass=tokens_per_pass)
        acc = r[task.label]
        out[task.label] = {"accuracy": acc, "centered": centered(acc, task.baseline), "n": r["n"],
                           "per_item": [row[task.label] for row in r["per_item"]]}
    core = sum(t["centered"] for t in out.values()) / len(out)
    return {"core": core, "tasks": out}


def check_tokenizable(tasks: list[Task], max_length: int) -> None:
    """Every item renders and tokenizes (the language-modelling prefix rule): one line before any work."""
    tokenizer = get_tokenizer()
    for task in tasks:
        for i in range(len(task.data)):
            requests(task, i, tokenizer, max_length)


# ----------------------------------------------------------------------------------------------
# In training


def build(cfg: CoreConfig, runtime):
    tasks = read_bundle(cfg.core, cfg.tasks, cfg.max_per_task)

    def run(model) -> dict:
        r = evaluate(model, tasks, runtime.device, runtime.autocast(), runtime.rank, runtime.world_size)
        return {"core": r["core"], **{f"core/{label}": t["centered"] for label, t in r["tasks"].items()}}
    return run


def check(cfg: CoreConfig) -> None:
    tasks = read_bundle(cfg.core, cfg.tasks, cfg.max_per_task)  # a missing or malformed bundle: one line, now
    check_tokenizable(tasks, 1 << 20)


register_eval(EvalSpec("core", CoreConfig, build, check, "CORE, DCLM's in-context tasks, as nanochat scores them"))
