"""Pretrain a GPT on Project Gutenberg books: the simple path.

    python pretraining_simple.py                       # embedded sample, small model, ~6 min on a laptop CPU
    python pretraining_simple.py --data_dir data/gutenberg_clean --model 124M --device cuda

The combined_*.txt files in --data_dir are tokenized once into a token cache (by default a
.token_cache folder beside them; later runs memory-map it, so a folder of many GB starts at once) and
every 10th block of 4,096 tokens (--val_fraction) is held out for validation. Train and validation
losses are printed every --eval_every steps, a sample every --sample_every steps; checkpoints,
losses.json and loss_plot.png go to the run folder (printed at the start). Ctrl-C saves a checkpoint;
the same command with --resume auto continues it.
"""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads: a quiet exit 130, not a traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import dataclasses
from pathlib import Path

import gpt_train as gt
import prep_dataset
import token_cache
import wt_load

SCRIPT = "pretraining_simple"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=gt.HelpFormatter)
    p.add_argument("--data_dir", type=Path, default=None,
                   help="folder of combined_*.txt files from prep_dataset.py (default: the embedded Gutenberg sample, "
                        f"prepared into {prep_dataset.DEFAULT_CLEAN_DIR})")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="share of the token stream held out for validation (whole 4,096-token blocks)")
    p.add_argument("--cache_dir", type=Path, default=None,
                   help="token cache of the text (default: .token_cache in --data_dir, made on the first run)")
    p.add_argument("--n_epochs", type=int, default=1, help="passes over the training text (unless --max_steps)")
    p.add_argument("--debug", action="store_true", help="tiny model and a handful of steps, for a smoke test")
    gt.add_shared_flags(p, model="small", batch_size=16, seed=123, eval_every=50, eval_iters=10, sample_every=200,
                        save_every=500, log_every=50)
    return p


RULES = [
    ("val_fraction", lambda v: gt.finite(v) and 0 < v < 1, "between 0 and 1"),
    ("n_epochs", lambda v: v >= 1, "at least 1"),
]


def load_corpus(data_dir: Path | None, val_fraction: float, context_length: int, cache_dir: Path | None = None,
                progress: bool = True):
    """Train/validation token windows of every combined_*.txt, through the token cache: tokenized
    on the first run, memory-mapped afterwards."""
    if data_dir is None:
        files = prep_dataset.prepare_default_corpus()
    else:
        if not data_dir.is_dir():
            raise gt.UserError(f"--data_dir {data_dir} is not a folder; run prep_dataset.py to make one, "
                               "or leave --data_dir out to use the embedded sample")
        files = sorted(data_dir.glob("combined_*.txt")) or sorted(data_dir.glob("*.txt"))
        if not files:
            raise gt.UserError(f"no combined_*.txt or .txt files in {data_dir}; run prep_dataset.py first")
    source = token_cache.DataSource("local", [[str(f) for f in files]], None, "text", [str(files[0].parent)])
    cache_dir = cache_dir or files[0].parent / ".token_cache"
    token_cache.build_cache(source, cache_dir, val_fraction=val_fraction, progress=progress)
    cache = token_cache.load_cache(cache_dir, source)
    train = gt.TokenWindowDataset(cache.train, context_length)
    val = gt.TokenWindowDataset(cache.val, context_length)
    if len(val) == 0:
        raise gt.UserError(f"the validation text is shorter than one window of {context_length + 1} tokens; "
                           "use more text, a larger --val_fraction or a smaller --context_length")
    return train, val, files


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.debug:
        args.model = "debug"
        args.max_steps = args.max_steps or 20
        args.eval_every, args.sample_every, args.log_every = 10, 10, 5
        args.batch_size = min(args.batch_size, 4)
    gt.check_flags(args, RULES)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = gt.get_config(args.model, context_length=args.context_length, drop_rate=args.drop_rate, flash=args.flash,
                        activation_checkpointing=args.activation_checkpointing)
    runtime = gt.setup_runtime(args.device, args.dtype, args.compile)
    run_dir = args.run_dir or gt.default_run_dir(SCRIPT, args)
    run = gt.open_run(runtime, run_dir, SCRIPT, gt.args_to_dict(args), args.resume, args.overwrite, args.keep_last,
                      gt.checkpoint_bytes(cfg))
    try:
        cfg = dataclasses.replace(cfg, vocab_multiple=gt.vocab_multiple_for(args.pad_vocab, runtime, run))
        return train(args, cfg, runtime, run)
    finally:
        run.release()


def train(args, cfg: gt.GPTConfig, runtime: gt.Runtime, run: gt.RunFolder) -> dict:
    gt.seed_everything(args.seed)
    model = wt_load.new_model(cfg, args.init_from)  # before the corpus: a bad --init_from fails fast
    train_data, val_data, files = load_corpus(args.data_dir, args.val_fraction, cfg.context_length, args.cache_dir,
                                              args.progress)
    steps_per_epoch = len(train_data) // (args.batch_size * args.grad_accum)
    max_steps = args.max_steps or max(1, args.n_epochs * steps_per_epoch)
    print(f"data: {len(files)} file(s), {train_data.num_tokens():,} train / {val_data.num_tokens():,} val tokens; "
          f"{steps_per_epoch} steps per epoch, {max_steps} steps")
    counts = gt.count_parameters(model)
    print(f"model: {args.model} ({counts['tied'] / 1e6:.1f}M parameters, {counts['non_embedding'] / 1e6:.1f}M "
          f"non-embedding) | {runtime.device} {runtime.dtype} ({runtime.dtype_reason}) | run folder {run.dir}")
    model = runtime.prepare(model)
    optimizer = gt.make_adamw(model, args.lr, args.weight_decay, device=runtime.device)
    tcfg = gt.train_config(args, max_steps)
    result = gt.run_training(model, optimizer, runtime, tcfg, train_data, val_data, run,
                             run_info={"script": SCRIPT, "args": gt.args_to_dict(args)})
    if not result["stop_reason"]:
        result["sample"] = gt.generate_and_print_sample(
            gt.unwrap_model(model), gt.get_tokenizer(), runtime.device, args.sample_prompt, 50,
            printer=lambda t: print(f"final sample: {t}"))
    return result


if __name__ == "__main__":
    gt.run_cli(main)
