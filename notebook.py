# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inside a GPT training run
#
# A walk through a trained model with the project's own code: loss curves, the learning-rate
# schedule, sampling, which tokens are hard, what one attention head looks at, and a small
# learning-rate sweep. Open it as a notebook (Jupyter with jupytext, VS Code, PyCharm) or run it
# headless: `python notebook.py` saves every figure as a PNG.
#
# Settings come from environment variables so the same file works in both worlds:
# `NOTEBOOK_CHECKPOINT` (a checkpoint to study; default: train a small model for about a minute on the
# embedded Gutenberg books), `NOTEBOOK_OUT` (figure folder, default `runs/notebook`),
# `NOTEBOOK_TOKENIZER` (gpt2 or a tokenizer folder to train that small model with; a checkpoint's own
# tokenizer is always the one used to read it), and `NOTEBOOK_QUICK=1` (tiny settings, for tests).

# %%
import json
import os
import sys
from pathlib import Path

from gptkit.errors import UserError
from gptkit.files import make_folder


def _one_line(kind, value, tb, _default=sys.excepthook):
    """Run headless, a bad setting or input is one `error:` line and exit code 2, as in the scripts."""
    if not isinstance(value, UserError):
        return _default(kind, value, tb)
    print(f"error: {value}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(value.exit_code)


if "ipykernel" not in sys.modules:
    sys.excepthook = _one_line


def settings() -> tuple[bool, Path | None, Path]:
    """NOTEBOOK_QUICK (0 or 1), NOTEBOOK_CHECKPOINT (an existing checkpoint, sharded folder or .safetensors)
    and NOTEBOOK_OUT (a folder), checked before anything slow is loaded."""
    quick = os.environ.get("NOTEBOOK_QUICK", "0")
    if quick not in ("0", "1", ""):
        raise UserError(f"NOTEBOOK_QUICK must be 0 or 1, got {quick!r}")
    checkpoint = os.environ.get("NOTEBOOK_CHECKPOINT") or None
    if checkpoint is not None and not Path(checkpoint).exists():
        raise UserError(f"NOTEBOOK_CHECKPOINT {checkpoint} does not exist; point it at a checkpoint (.pt), a sharded "
                        "checkpoint's folder or a .safetensors export, or unset it to train a small model here")
    out = Path(os.environ.get("NOTEBOOK_OUT") or "runs/notebook")
    make_folder(out, "NOTEBOOK_OUT", "point NOTEBOOK_OUT at a writable folder for the figures")
    return quick == "1", Path(checkpoint) if checkpoint else None, out


QUICK, CHECKPOINT, OUT = settings()

import matplotlib  # noqa: E402

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpt_train as gt  # noqa: E402
import pretraining_simple  # noqa: E402
from gptkit.schedules import ScheduleConfig, lr_function, resolve  # noqa: E402
from gptkit.weights import source_tokenizer  # noqa: E402

figures = []
TOKENIZER = os.environ.get("NOTEBOOK_TOKENIZER") or None  # gpt2 or a tokenizer folder, to train the fresh model with


def save(fig, name):
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    figures.append(path)
    print(f"saved {path}")


# %% [markdown]
# ## 1. A model to look at
# Either the checkpoint you point at, or a fresh one: the `small` preset trained for about a minute
# (the `debug` preset for a few seconds when `NOTEBOOK_QUICK=1`) with `pretraining_simple.py`'s own main().

# %%
if CHECKPOINT is None:
    quick_flags = ["--model", "debug", "--max_steps", "30", "--batch_size", "8", "--lr", "3e-3"]
    small_flags = ["--model", "small", "--max_steps", "40", "--batch_size", "8", "--lr", "1e-3"]
    run = pretraining_simple.main([*(quick_flags if QUICK else small_flags), "--output_dir", str(OUT / "train"),
                                   "--eval_freq", "10", "--eval_iter", "3", "--print_sample_iter", "0",
                                   "--no-progress", "--log_every", "10", "--overwrite",
                                   *(["--tokenizer", TOKENIZER] if TOKENIZER else [])])
    CHECKPOINT = run["checkpoint"]
model, ckpt = gt.load_ours(CHECKPOINT)  # a .pt file, a sharded checkpoint's folder or a .safetensors export
tokenizer = gt.use_tokenizer(source_tokenizer(str(CHECKPOINT)))  # the checkpoint's own: its ids mean its text
if TOKENIZER and gt.load_tokenizer(TOKENIZER).fingerprint() != tokenizer.fingerprint():
    raise UserError(f"NOTEBOOK_TOKENIZER {TOKENIZER} is not the tokenizer {CHECKPOINT} was trained with "
                    f"({tokenizer.name}); unset it: the checkpoint's own is used")
print(f"{CHECKPOINT}: step {ckpt.get('step', 0)}, {gt.count_parameters(model)['total']:,} parameters")

# %% [markdown]
# ## 2. Train and validation loss
# The checkpoint carries its own history: the loss of every step, and validation at each evaluation.

# %%
h = (ckpt.get("progress") or {}).get("history") or {}
if h.get("step"):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(h["step"], h["train_loss"], label="train (per step)")
    if h.get("val_loss"):
        ax.plot(h["val_step"], h["val_loss"], "o--", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy loss", title="loss curves")
    ax.legend()
    save(fig, "loss_curves")
else:
    print("this checkpoint carries no training history (a weights-only export): no loss curves")

# %% [markdown]
# ## 3. The learning-rate schedule `pretraining_advanced.py` uses by default
# From the schedule registry the scripts use (gptkit/schedules.py): linear warmup, then cosine decay.

# %%
spec, schedule = resolve(ScheduleConfig(schedule="cosine", warmup_steps=200), lr=6e-4, max_steps=2000)
lr_at = lr_function(spec, schedule)
steps = range(schedule.max_steps + 1)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(steps, [lr_at(s) for s in steps])
ax.set(xlabel="step", ylabel="learning rate", title="warmup + cosine (--lr 6e-4 --warmup_steps 200)")
save(fig, "lr_schedule")

# %% [markdown]
# ## 4. Sampling: temperature, top-k and top-p
# Temperature 0 is greedy; higher temperatures flatten the distribution, top-k and top-p cut its tail.
# Generation keeps a key/value cache: the prompt runs once, then each token costs one position.

# %%
prompt = "Holmes looked at me and said"
for temperature, top_k, top_p in ((0.0, None, None), (0.7, 40, None), (1.0, None, 0.9), (1.5, None, None)):
    text = gt.generate_and_print_sample(model, tokenizer, "cpu", prompt, max_new_tokens=25, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=1, printer=lambda t: None)
    print(f"T={temperature:<4} top_k={top_k!s:<5} top_p={top_p!s:<5} {text!r}")

# %% [markdown]
# ## 5. Which tokens are hard?
# The loss of each next-token prediction on a passage: names and rare words cost the most.

# %%
passage = ("To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other name. "
           "In his eyes she eclipses and predominates the whole of her sex.")
ids = gt.text_to_token_ids(passage, tokenizer)[:, : model.cfg.context_length]
with torch.no_grad():
    logits = model(ids[:, :-1])
per_token = F.cross_entropy(logits[0], ids[0, 1:], reduction="none")
tokens = [tokenizer.decode([t]) for t in ids[0, 1:].tolist()]
hardest = per_token.argsort(descending=True)[:8]
print("hardest tokens:", [(tokens[i], round(per_token[i].item(), 2)) for i in hardest.tolist()])
fig, ax = plt.subplots(figsize=(10, 3))
ax.bar(range(len(tokens)), per_token.numpy())
ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
ax.set(ylabel="loss (nats)", title=f"per-token loss, mean {per_token.mean():.2f}")
save(fig, "per_token_loss")

# %% [markdown]
# ## 6. What one attention head looks at
# Run the blocks up to layer `LAYER` and ask its attention for the weights (the explicit path computes
# them; SDPA never materialises them). Each row is a query position; it can only look left.

# %%
LAYER, HEAD = model.cfg.n_layers - 1, 0
ids = gt.text_to_token_ids("It was the best of times, it was the worst of times, it was the age of wisdom",
                           tokenizer)[:, : model.cfg.context_length]
with torch.no_grad():
    x = model.embed(ids)  # tokens (and learned positions, and the embedding's norm, as the arch has them)
    for block in model.h[:LAYER]:
        x = block(x)
    _, att = model.h[LAYER].attn(model.h[LAYER].ln_1(x), return_attn=True)
labels = [tokenizer.decode([t]) for t in ids[0].tolist()]
fig, ax = plt.subplots(figsize=(6, 6))
ax.imshow(att[0, HEAD].numpy(), cmap="viridis")
ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
ax.set_yticks(range(len(labels)), labels, fontsize=7)
ax.set(title=f"layer {LAYER}, head {HEAD}")
save(fig, "attention_map")

# %% [markdown]
# ## 7. A small learning-rate sweep
# The same short run at three learning rates, validation loss side by side.

# %%
sweep = {}
for lr in (3e-4, 1e-3, 3e-3):
    res = pretraining_simple.main(["--model", "debug", "--max_steps", "12" if QUICK else "60", "--batch_size", "8",
                                   "--lr", str(lr), "--eval_freq", "4" if QUICK else "10", "--eval_iter", "2",
                                   "--print_sample_iter", "0", "--save_ckpt_freq", "0", "--no-progress",
                                   "--log_every", "1000", "--output_dir", str(OUT / f"sweep_lr{lr:g}"), "--overwrite"])
    sweep[lr] = res["history"]
fig, ax = plt.subplots(figsize=(6, 3.5))
for lr, hist in sweep.items():
    ax.plot(hist["val_step"], hist["val_loss"], "o-", label=f"lr {lr:g}")
ax.set(xlabel="step", ylabel="validation loss", title="learning-rate sweep (debug model)")
ax.legend()
save(fig, "lr_sweep")

# %%
summary = {"checkpoint": str(CHECKPOINT), "figures": [str(p) for p in figures],
           "final_val_loss": {f"{lr:g}": hist["val_loss"][-1] for lr, hist in sweep.items()}}
(OUT / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
