"""Pretrain a GPT on Project Gutenberg books: the simple path.

    python pretraining_simple.py                       # embedded sample, small model, ~5 min on a laptop CPU
    python pretraining_simple.py --data_dir data/gutenberg_clean --model 124M --device cuda

The combined_*.txt files in --data_dir are tokenized once into a token cache (by default a
.token_cache folder beside them; later runs memory-map it, so a folder of many GB starts at once) and
every 10th block of 4,096 tokens (--val_fraction) is held out for validation. Train and validation
losses are printed every --eval_every steps, a sample every --sample_every steps; checkpoints,
losses.json and loss_plot.png go to the run folder (printed at the start). Ctrl-C saves a checkpoint;
the same command with --resume auto continues it. AdamW at a constant LR by default; --optimizer and
--schedule choose others.
"""

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import gpt_train as gt
from gptkit import evals
from gptkit.args import SharedSettings, add_shared_flags, shared_settings
from gptkit.config import HelpFormatter, add_flags, at_least, between, from_args, parse, setting
from gptkit.data import cache as token_cache
from gptkit.data.sources import DataSource
from gptkit.gutenberg.prepare import DEFAULT_CLEAN_DIR, prepare_default_corpus
from gptkit.optim import build_optimizer, optimizer_spec
from gptkit.planner import TrainSetup, machine_memory, refuse_unfittable
from gptkit.plugins import preload
from gptkit.schedules import lr_function, resolve
from gptkit.weights import new_model

SCRIPT = "pretraining_simple"
DEFAULTS = dict(model="small", batch_size=16, seed=123, eval_every=50, eval_iters=10, sample_every=200, save_every=500,
                log_every=50, schedule="constant", warmup_steps=0)


@dataclass
class BookData:
    data_dir: Path | None = setting(None, "folder of combined_*.txt files from prep_dataset.py (default: the embedded "
                                          f"Gutenberg sample, prepared into {DEFAULT_CLEAN_DIR})")
    val_fraction: float = setting(0.1, "share of the token stream held out for validation (whole 4,096-token blocks)",
                                  check=(between(0, 1), "between 0 and 1"))
    cache_dir: Path | None = setting(None, "token cache of the text (default: .token_cache in --data_dir, made on the "
                                           "first run; .token_cache-NAME-HASH for a --tokenizer other than gpt2)")
    n_epochs: int = setting(1, "passes over the training text (unless --max_steps)", check=(at_least(1), "at least 1"))


@dataclass
class Settings:
    data: BookData
    shared: SharedSettings
    evals: list  # enabled evaluations' configs (gptkit.evals)
    args: argparse.Namespace  # as parsed: recorded in run.json and checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_flags(p.add_argument_group("data"), BookData)
    add_shared_flags(p, **DEFAULTS)
    evals.add_eval_flags(p)
    return p


def parse_args(argv=None) -> Settings:
    plugins = preload(argv)  # before the parser: a plugin's components are choices and flags of it
    args, given = parse(build_parser(), argv)
    shared = shared_settings(args, given, plugins)
    gt.refuse_together(given, ("max_steps", "n_epochs", "--max_steps sets the length of the run, --n_epochs too"))
    return Settings(from_args(BookData, args), shared, evals.enabled(args, given), args)


def corpus_files(data_dir: Path) -> list[Path]:
    """The combined_*.txt (else *.txt) files of --data_dir, or one error line saying what is wrong."""
    if not data_dir.is_dir():
        raise gt.UserError(f"--data_dir {data_dir} is not a folder; run prep_dataset.py to make one, "
                           "or leave --data_dir out to use the embedded sample")
    files = sorted(data_dir.glob("combined_*.txt")) or sorted(data_dir.glob("*.txt"))
    if not files:
        raise gt.UserError(f"no combined_*.txt or .txt files in {data_dir}; run prep_dataset.py first")
    return files


def load_corpus(data_dir: Path | None, val_fraction: float, context_length: int, cache_dir: Path | None = None,
                progress: bool = True):
    """Train/validation token windows of every combined_*.txt, through the token cache: tokenized
    on the first run, memory-mapped afterwards."""
    files = corpus_files(data_dir) if data_dir is not None else prepare_default_corpus()
    source = DataSource("local", [[str(f) for f in files]], None, "text", [f"{files[0].parent} ({len(files)} file(s))"])
    cache_dir = cache_dir or files[0].parent / gt.default_cache_name()
    token_cache.build_cache(source, cache_dir, val_fraction=val_fraction, progress=progress)
    cache = token_cache.load_cache(cache_dir, source)
    train = gt.TokenWindowDataset(cache.train, context_length)
    val = gt.TokenWindowDataset(cache.val, context_length)
    if len(val) == 0:
        raise gt.UserError(f"the validation text is shorter than one window of {context_length + 1} tokens; "
                           "use more text, a larger --val_fraction or a smaller --context_length")
    return train, val, files


def main(argv=None) -> dict:
    s = parse_args(argv)
    sh = s.shared
    cfg = sh.model_config
    run_dir = sh.run.run_dir or gt.default_run_dir(SCRIPT, s.args, build_parser())
    if sh.run.check:
        return check(s, cfg, run_dir)
    inputs_ok(s, cfg)  # what --check checks, before the run folder is touched (the folder: as it is claimed)
    runtime = gt.setup_runtime(sh.runtime.device, sh.runtime.dtype, sh.runtime.compile)
    kind = optimizer_spec(sh.optim.optimizer).kind
    run = gt.open_run(runtime, run_dir, SCRIPT, gt.args_to_dict(s.args), sh.run.resume, sh.run.overwrite,
                      sh.run.keep_last, gt.checkpoint_bytes(cfg, sh.optim.optimizer, sh.optimizer_config), sh.plugins,
                      accept=lambda ckpt: gt.check_resume(ckpt, cfg, kind, sh.model.pad_vocab))
    with gt.holding(run):
        cfg = dataclasses.replace(cfg, vocab_multiple=gt.vocab_multiple_for(sh.model.pad_vocab, runtime, run))
        return train(s, cfg, runtime, run)


def inputs_ok(s: Settings, cfg: gt.GPTConfig) -> list[Path] | None:
    """The device, the data folder and the model's size against the machine, planned, nothing allocated
    (--init_from's config was read and checked with the settings): one error line for the first wrong."""
    sh = s.shared
    device = gt.resolve_device(sh.runtime.device)
    files = corpus_files(s.data.data_dir) if s.data.data_dir is not None else None
    setup = TrainSetup(batch_size=sh.batch.batch_size, dtype="fp32", optimizer=sh.optim.optimizer,
                       optimizer_config=sh.optimizer_config, cuda=device.type == "cuda")
    refuse_unfittable(cfg, setup, machine_memory(device.type), f"this machine's {device.type} memory")
    return files


def check(s: Settings, cfg: gt.GPTConfig, run_dir: Path) -> dict:
    """--check: the data folder, --init_from and the run folder, as the run would see them; no training."""
    sh = s.shared
    files = inputs_ok(s, cfg)
    what = (f"model {sh.model.model} ({gt.count_parameters_from_config(cfg)['total'] / 1e6:.1f}M parameters) | data "
            f"{f'{len(files)} file(s) in {s.data.data_dir}' if files else 'the embedded Gutenberg sample'}")
    return gt.check_run(run_dir, cfg, sh.run.resume, sh.run.overwrite, optimizer_spec(sh.optim.optimizer).kind,
                        sh.model.pad_vocab, what, sh.plugins)


def train(s: Settings, cfg: gt.GPTConfig, runtime: gt.Runtime, run: gt.RunFolder) -> dict:
    sh = s.shared
    gt.seed_everything(sh.run.seed)
    model = new_model(cfg, sh.run.init_from)  # before the corpus: a bad --init_from fails fast
    train_data, val_data, files = load_corpus(s.data.data_dir, s.data.val_fraction, cfg.context_length,
                                              s.data.cache_dir, sh.log.progress)
    steps_per_epoch = len(train_data) // (sh.batch.batch_size * sh.batch.grad_accum)
    max_steps = sh.batch.max_steps or max(1, s.data.n_epochs * steps_per_epoch)
    if sh.batch.tokens_per_param:
        max_steps = gt.steps_for_tokens_per_param(sh, sh.batch.batch_size * cfg.context_length * sh.batch.grad_accum)
    print(f"data: {len(files)} file(s), {train_data.num_tokens():,} train / {val_data.num_tokens():,} val tokens; "
          f"{steps_per_epoch} steps per epoch, {max_steps} steps")
    counts = gt.count_parameters(model)
    print(f"model: {sh.model.label} ({counts['total'] / 1e6:.1f}M parameters, {counts['non_embedding'] / 1e6:.1f}M "
          f"non-embedding) | {runtime.device} {runtime.dtype} ({runtime.dtype_reason}) | {sh.optim.optimizer}, "
          f"{sh.schedule.schedule} LR | run folder {run.dir}")
    model = runtime.prepare(model)
    spec = optimizer_spec(sh.optim.optimizer)
    optimizer = build_optimizer(model, sh.optim, sh.optimizer_config, runtime.device)
    sched_spec, schedule = resolve(sh.schedule, sh.optim.lr, max_steps, sh.given, sh.schedule_config)
    result = gt.run_training(model, optimizer, runtime, gt.train_config(sh, max_steps), train_data, val_data, run,
                             lr_fn=lr_function(sched_spec, schedule), optimizer_spec=spec,
                             evaluations=tuple(evals.build(s.evals, runtime)),
                             run_info={"script": SCRIPT, "args": gt.args_to_dict(s.args), "optimizer": spec.name,
                                       "dtype": runtime.dtype,
                                       "plugins": [p.record() for p in sh.plugins],
                                       "schedule": {"name": sched_spec.name, **dataclasses.asdict(schedule)}})
    if not result["stop_reason"]:
        result["sample"] = gt.generate_and_print_sample(
            gt.unwrap_model(model), gt.get_tokenizer(), runtime.device, sh.log.sample_prompt, 50,
            printer=lambda t: print(f"final sample: {t}"))
    return result


if __name__ == "__main__":
    gt.run_cli(main)
