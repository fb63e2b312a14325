"""Pretrain a GPT on Project Gutenberg books: the simple path.

    python pretraining_simple.py                       # embedded sample, small model, ~8 min on a laptop CPU
    python pretraining_simple.py --data_dir data/gutenberg_clean --model 124M --device cuda

Every combined_*.txt in --data_dir is split 90/10 into train/validation text. Train and validation
losses are printed every --eval_freq steps, a sample every --print_sample_iter steps; checkpoints,
losses.json and loss_plot.png go to --output_dir. Ctrl-C saves a checkpoint; --resume continues it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gpt_train as gt
import prep_dataset
import wt_load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=None,
                   help="folder of combined_*.txt files from prep_dataset.py (default: the embedded Gutenberg sample, "
                        f"prepared into {prep_dataset.DEFAULT_CLEAN_DIR})")
    p.add_argument("--output_dir", type=Path, default=Path("runs/simple"), help="checkpoints, plot and losses go here")
    p.add_argument("--model", default="small", help=f"model preset: {', '.join(gt.PRESETS)}")
    p.add_argument("--context_length", type=int, default=None, help="override the preset's context length")
    p.add_argument("--drop_rate", type=float, default=0.0, help="dropout rate")
    p.add_argument("--debug", action="store_true", help="tiny model and a handful of steps, for a smoke test")
    p.add_argument("--n_epochs", type=int, default=1, help="passes over the training text")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (overrides epochs)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per batch")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay on 2-D weights")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    p.add_argument("--eval_freq", type=int, default=50, help="evaluate every N steps")
    p.add_argument("--eval_iter", type=int, default=10, help="batches per evaluation")
    p.add_argument("--print_sample_iter", type=int, default=200, help="print a generated sample every N steps")
    p.add_argument("--save_ckpt_freq", type=int, default=500, help="save a checkpoint every N steps (and at the end)")
    p.add_argument("--keep_last", type=int, default=3, help="checkpoints kept in --output_dir (0: all)")
    p.add_argument("--log_every", type=int, default=50, help="print a log line every N steps")
    p.add_argument("--start_context", default="Every effort moves you", help="prompt for the samples")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of each file held out for validation")
    p.add_argument("--seed", type=int, default=123, help="random seed (init, batch order, dropout)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--init_from", default=None,
                   help="start from pretrained weights only: gpt2, gpt2-medium, ..., a HF GPT-2 folder or a checkpoint "
                        "(the --model preset must match them)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' for the newest in --output_dir")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    return p


def load_corpus(data_dir: Path | None, val_fraction: float, context_length: int):
    """Train/validation token windows from every combined_*.txt (each file split by characters)."""
    if data_dir is None:
        files = prep_dataset.prepare_default_corpus()
    else:
        if not data_dir.is_dir():
            raise gt.UserError(f"--data_dir {data_dir} is not a folder; run prep_dataset.py to make one, "
                               "or leave --data_dir out to use the embedded sample")
        files = sorted(data_dir.glob("combined_*.txt")) or sorted(data_dir.glob("*.txt"))
        if not files:
            raise gt.UserError(f"no combined_*.txt or .txt files in {data_dir}; run prep_dataset.py first")
    if not 0.0 < val_fraction < 1.0:
        raise gt.UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    train_texts, val_texts = [], []
    for f in files:
        text = f.read_text(encoding="utf-8")
        cut = int(len(text) * (1 - val_fraction))
        train_texts.append(text[:cut])
        val_texts.append(text[cut:])
    train = gt.TokenWindowDataset([gt.encode_documents([t]) for t in train_texts], context_length)
    val = gt.TokenWindowDataset([gt.encode_documents([t]) for t in val_texts], context_length)
    if len(val) == 0:
        raise gt.UserError(f"the validation text is shorter than one window of {context_length + 1} tokens; "
                           "use more text, a larger --val_fraction or a smaller --context_length")
    return train, val, files


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.debug:
        args.model = "debug"
        args.max_steps = args.max_steps or 20
        args.eval_freq, args.print_sample_iter, args.log_every = 10, 10, 5
        args.batch_size = min(args.batch_size, 4)
    cfg = gt.get_config(args.model, context_length=args.context_length, drop_rate=args.drop_rate)
    gt.seed_everything(args.seed)
    runtime = gt.setup_runtime(args.device)
    train_data, val_data, files = load_corpus(args.data_dir, args.val_fraction, cfg.context_length)
    batches_per_epoch = len(train_data) // args.batch_size
    max_steps = args.n_epochs * batches_per_epoch
    if args.max_steps is not None:
        max_steps = args.max_steps
    print(f"data: {len(files)} file(s), {train_data.num_tokens():,} train / {val_data.num_tokens():,} val tokens; "
          f"{batches_per_epoch} batches per epoch, {max_steps} steps")

    model = wt_load.new_model(cfg, args.init_from)
    counts = gt.count_parameters(model)
    print(f"model: {args.model} ({counts['tied'] / 1e6:.1f}M parameters, {counts['non_embedding'] / 1e6:.1f}M "
          f"non-embedding), device {runtime.device}")
    model = runtime.prepare(model)
    optimizer = gt.make_adamw(model, args.lr, args.weight_decay, device=runtime.device)
    tcfg = gt.TrainConfig(max_steps=max_steps, max_grad_norm=args.max_grad_norm, log_every=args.log_every,
                          eval_every=args.eval_freq, sample_every=args.print_sample_iter,
                          save_every=args.save_ckpt_freq, progress=args.progress)
    result = gt.run_training(
        model, optimizer, runtime, tcfg, train_data, val_data, batch_size=args.batch_size, seed=args.seed,
        run_dir=args.output_dir, keep_last=args.keep_last, resume=args.resume, eval_iter=args.eval_iter,
        sample_prompt=args.start_context, extra={"script": "pretraining_simple", "args": gt.args_to_dict(args)},
    )
    result["sample"] = gt.generate_and_print_sample(
        gt.unwrap_model(model), gt.get_tokenizer(), runtime.device, args.start_context, 50,
        printer=lambda t: print(f"final sample: {t}"))
    return result


if __name__ == "__main__":
    gt.run_cli(main)
