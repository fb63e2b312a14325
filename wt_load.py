"""Weights in and out: Hugging Face GPT-2, Llama, Qwen3 and Mistral (without a sliding window) folders
and OpenAI's GPT-2 in, our checkpoints out, and back to Hugging Face; inspect, generate, evaluate.

    python wt_load.py inspect runs/simple/ckpt_00000200.pt
    python wt_load.py from-hf openai-community/gpt2 gpt2.pt        # or a local HF dir, or gpt2-medium ...
    python wt_load.py from-openai models/124M gpt2.pt              # OpenAI's TF checkpoint (needs tensorflow)
    python wt_load.py to-hf runs/simple/ckpt_00000200.pt hf_out/   # GPT2LMHeadModel, LlamaForCausalLM or Qwen3
    python wt_load.py to-safetensors runs/simple/ckpt_00000200.pt model.safetensors
    python wt_load.py generate gpt2.pt --prompt "Every effort moves you"

Our GPTModel uses Hugging Face's GPT-2 parameter names (minus `transformer.`), with nn.Linear where
GPT-2 has Conv1D; gptkit/hf.py maps them to and from each architecture's names (DESIGN.md).
"""

from __future__ import annotations

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import json
import time
from pathlib import Path

import torch

import gpt_train as gt
from gptkit.evals import core, hellaswag
from gptkit.hf import HF_SIZES, export_hf, hf_architecture, load_hf, model_card, ours_to_hf  # noqa: F401
from gptkit.plugins import add_plugin_flag, preload
from gptkit.weights import (  # noqa: F401  (the library of this command line, re-exported for older code)
    export_safetensors,
    fresh_file,
    init_weights,
    load_any,
    load_into,
    load_openai,
    load_ours,
    new_model,
    save_from_model,
    source_tokenizer,
    unpadded_state_dict,
)

# ----------------------------------------------------------------------------------------------
# Inspect and CLI


def _optimizer_summary(opt: dict) -> str:
    """How many parameter states an optimizer state dict holds (one optimizer's, or each of a chain's)."""
    parts = [opt] if "state" in opt else [v for v in opt.values() if isinstance(v, dict) and "state" in v]
    states = [s for part in parts for s in part["state"].values()]
    kinds = sorted({k for st in states for k in st})
    return f"{len(states)} parameter states ({', '.join(kinds)})" if states else "empty"


def describe_checkpoint(path) -> dict:
    path = Path(path)
    model, ckpt = load_ours(path)
    counts = gt.count_parameters(model)
    opt = ckpt.get("optimizer")
    opt_desc = "sharded with the weights" if ckpt.get("sharded") else "none"
    if opt:
        opt_desc = _optimizer_summary(opt)
    extra = ckpt.get("run") or {}
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    return {"path": str(path), "size_mb": round(size / 2**20, 2), "config": ckpt["config"],
            "sharded": bool(ckpt.get("sharded")),
            "step": ckpt.get("step", 0), "tokens_seen": ckpt.get("tokens_seen", 0), "parameters": counts["total"],
            "optimizer_state": opt_desc, "optimizer": (opt or {}).get("kind") or ckpt.get("optimizer_kind"),
            "data_position": (ckpt.get("data") or {}).get("position"), "script": extra.get("script"),
            "run_id": ckpt.get("run_id")}


NOT_A_SETTING = ("run_dir", "resume", "overwrite", "check", "config")


def write_run_config(path, out: Path) -> Path:
    """The settings a checkpoint's run recorded, as a --config file: the same command line starts the
    same run (in a new --run_dir; where to run and whether to resume are not settings)."""
    fresh_file(out)
    ckpt = gt.load_checkpoint(path)
    run = ckpt.get("run") or {}
    args = run.get("args")
    if not args:
        raise gt.UserError(f"{path} records no training settings (a converted or exported weights file?)")
    settings = {k: v for k, v in args.items() if k not in NOT_A_SETTING and k != "plugin"}
    if settings.get("dtype") == "auto" and run.get("dtype"):
        settings["dtype"] = run["dtype"]  # what --dtype auto chose on the machine that ran it
    script = run.get("script", "pretraining_advanced")
    header = (f"Settings of run {ckpt.get('run_id')} at step {ckpt.get('step')}\n"
              f"python {script}.py --config {out.name} --run_dir NEW_FOLDER")
    # A checkpoint may come from anyone: the code it names is never imported because a file says so.
    # Its plugins are listed here for a person to read, check, and give with --plugin themselves.
    for p in run.get("plugins") or args.get("plugin") or []:
        name = (p.get("name") or p.get("path")) if isinstance(p, dict) else p
        header += f"\nthe run loaded a plugin: {str(name)[:200]!r}; read it, then add --plugin PATH yourself"
    return gt.write_config_file(out, settings, header=header)


def build_parser() -> argparse.ArgumentParser:
    fmt = gt.HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=gt.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="print what a checkpoint holds", formatter_class=fmt)
    s.add_argument("path", help="a checkpoint (.pt), a sharded checkpoint's folder or a weights export (.safetensors)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--config_out", "--config-out", type=Path, default=None, metavar="FILE",
                   help="also write the settings the checkpoint's run recorded to a .toml or .yaml file that "
                        "--config reads back (the training script named in its first line starts the same run)")
    s = sub.add_parser("from-hf", help="a Hugging Face GPT-2, Llama, Qwen3 or Mistral model (folder, hub id or GPT-2 "
                       "size name) -> our checkpoint",
                       formatter_class=fmt)
    s.add_argument("source", help=f"HF folder, hub id, or one of {', '.join(HF_SIZES)}")
    s.add_argument("out", help="checkpoint file to write (.pt)")
    s = sub.add_parser("from-openai", help="OpenAI's TF checkpoint folder -> our checkpoint", formatter_class=fmt)
    s.add_argument("source", help="folder with hparams.json and model.ckpt.*")
    s.add_argument("out", help="checkpoint file to write (.pt)")
    s = sub.add_parser("to-hf", help="our checkpoint -> a Hugging Face folder of the architecture that computes the "
                       "same (GPT-2, Llama or Qwen3), with its tokenizer", formatter_class=fmt)
    s.add_argument("checkpoint", help="a training checkpoint (.pt or a sharded checkpoint's folder) of either script")
    s.add_argument("out_dir", help="new folder for config.json + model.safetensors")
    s = sub.add_parser("to-safetensors", help="our checkpoint -> weights-only .safetensors", formatter_class=fmt)
    s.add_argument("checkpoint", help="a training checkpoint (.pt or a sharded checkpoint's folder)")
    s.add_argument("out", help=".safetensors file to write")
    s = sub.add_parser("generate", help="generate text from any weights this tool reads", formatter_class=fmt)
    s.add_argument("source", help="checkpoint, .safetensors, HF folder or GPT-2 size name")
    s.add_argument("--prompt", action="append", default=None,
                   help="text to continue (empty: from <|endoftext|>); repeat it for several prompts, generated in "
                        "one batch (default: 'Every effort moves you')")
    s.add_argument("--max_new_tokens", type=int, default=50, help="tokens to generate (at least 1)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; above 0 samples")
    s.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens (at least 1)")
    s.add_argument("--top_p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches P (in (0, 1])")
    s.add_argument("--seed", type=int, default=123, help="sampling seed")
    s.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    s = sub.add_parser("eval", help="score any weights on HellaSwag (as lm-evaluation-harness) or CORE (as nanochat)",
                       formatter_class=fmt)
    s.add_argument("source", help="checkpoint, sharded checkpoint folder, .safetensors, HF folder or GPT-2 size name")
    s.add_argument("--hellaswag", type=Path, default=None,
                   help=f"HellaSwag's hellaswag_val.jsonl (from {hellaswag.HELLASWAG_URL})")
    s.add_argument("--limit", type=int, default=None, help="HellaSwag: score only the first N items (default: all)")
    s.add_argument("--core", type=Path, default=None,
                   help=f"the DCLM eval bundle folder (eval_bundle, from {core.BUNDLE_URL}): CORE and each task's score")
    s.add_argument("--tasks", default=None, help="CORE: comma-separated task labels (default: all)")
    s.add_argument("--max_per_task", type=int, default=None, help="CORE: items per task, after its seeded shuffle "
                                                                  "(default: all)")
    s.add_argument("--batch_items", type=int, default=8, help="HellaSwag items per forward pass (each with its 4 endings)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    s.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="precision of the forward pass")
    for spec in plugin_evals():  # evaluations of plugins: their own flags, as in the training scripts
        gt.add_flags(s.add_argument_group(f"evaluation: {spec.name}"), spec.config, prefix=spec.name)
    s.add_argument("--json", action="store_true", help="print the result as JSON only")
    for name in ("generate", "eval", "to-hf", "from-hf"):
        sub.choices[name].add_argument("--tokenizer", default=None, help="the tokenizer the weights were trained with "
                                       "(default and check: the one the source carries; refused if it differs)")
    for sub_parser in (p, *sub.choices.values()):  # before or after the command
        add_plugin_flag(sub_parser)
    return p


def use_source_tokenizer(source: str, flag: str | None = None):
    """The tokenizer a source carries (a checkpoint's, an export's, a Hugging Face folder's), made the
    process's; --tokenizer naming another is refused in one line."""
    tok = source_tokenizer(source, "source")
    if flag is not None and gt.load_tokenizer(flag).fingerprint() != tok.fingerprint():
        raise gt.UserError(f"--tokenizer {flag} is not the tokenizer {source} was trained with ({tok.name}, "
                           f"{tok.n_vocab:,} ids); drop --tokenizer: the source's own is used")
    return gt.use_tokenizer(tok)


GENERATE_RULES = [
    ("max_new_tokens", lambda v: v >= 1, "at least 1"),
    ("temperature", lambda v: gt.finite(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    ("top_k", lambda v: v is None or v >= 1, "at least 1"),
    ("top_p", lambda v: v is None or (gt.finite(v) and 0 < v <= 1), "in (0, 1]"),
    ("seed", lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295"),
    ("limit", lambda v: v is None or v >= 1, "at least 1"),
    ("batch_items", lambda v: v >= 1, "at least 1"),
    ("max_per_task", lambda v: v is None or v >= 1, "at least 1"),
]


def _check(args) -> None:
    for name, ok, what in GENERATE_RULES:
        if hasattr(args, name) and not ok(getattr(args, name)):
            raise gt.UserError(f"--{name} must be {what}, got {getattr(args, name)}")


def main(argv=None):
    preload(argv)  # a plugin's parts (an attention, a norm...) must be known to read a checkpoint that uses them
    args = build_parser().parse_args(argv)
    _check(args)
    return COMMANDS[args.command](args)


def _inspect(args) -> dict:
    info = describe_checkpoint(args.path)
    if args.config_out:
        info["config_out"] = str(write_run_config(args.path, args.config_out))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>15}: {json.dumps(v) if isinstance(v, dict) else v}")
    return info


def _convert_in(args) -> Path:
    fresh_file(Path(args.out))
    if args.command == "from-hf":
        use_source_tokenizer(args.source, args.tokenizer)  # the folder's own: the checkpoint carries it
    model = load_hf(args.source) if args.command == "from-hf" else load_openai(args.source)
    out = save_from_model(model, args.out, args.source)
    print(f"wrote {out} ({gt.count_parameters(model)['total'] / 1e6:.1f}M parameters)")
    return out


def _generate(args) -> str | list[str]:
    """Continuations of the prompts, with a KV cache; several prompts run as one batch."""
    device = gt.resolve_device(args.device)
    tok = use_source_tokenizer(args.source, args.tokenizer)
    model = load_any(args.source).to(device).eval()
    prompts = args.prompt or ["Every effort moves you"]
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
    ids = [gt.text_to_token_ids(p, tok)[0].tolist() for p in prompts]
    rows = gt.generate_batch(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             eos_id=tok.eot_token, generator=gen, pad_id=tok.eot_token)
    texts = [gt.token_ids_to_text(p + r, tok) for p, r in zip(ids, rows)]
    for text in texts:
        print(text.replace("\n", " "))
    return texts[0] if len(texts) == 1 else texts


def _export(args) -> Path:
    use_source_tokenizer(args.checkpoint, getattr(args, "tokenizer", None))  # an export carries it
    model, ckpt = load_ours(args.checkpoint)
    if args.command == "to-hf":
        out = export_hf(model, args.out_dir, ckpt, args.checkpoint)
    else:
        out = export_safetensors(model, args.out, ckpt)
    print(f"wrote {out}")
    return out


def plugin_evals() -> list:
    """Registered evaluations besides HellaSwag and CORE (whose flags here are their own): plugins'."""
    from gptkit.evals import EVALS

    return [spec for name, spec in EVALS.items() if name not in ("hellaswag", "core")]


def _other_evals(args) -> list:
    """(spec, its settings) of the plugin evaluations this command line turns on, checked."""
    out = []
    for spec in plugin_evals():
        cfg = gt.from_args(spec.config, args, prefix=spec.name)
        if spec.enabled(cfg):
            spec.check(cfg)
            out.append((spec, cfg))
    return out


def _eval(args) -> dict:
    others = _other_evals(args)
    if args.hellaswag is None and args.core is None and not others:
        raise gt.UserError("eval needs --hellaswag FILE or --core BUNDLE (or both, or a plugin's evaluation)")
    if args.core is None and (args.tasks or args.max_per_task):
        raise gt.UserError(f"--{'tasks' if args.tasks else 'max_per_task'} is a setting of --core; add --core BUNDLE")
    # The inputs first: a bad file fails before the model is loaded.
    items = hellaswag.read_items(args.hellaswag, args.limit) if args.hellaswag else None
    tasks = core.read_bundle(args.core, args.tasks, args.max_per_task) if args.core else None
    use_source_tokenizer(args.source, args.tokenizer)  # items are tokenized as the model was trained
    if tasks:
        core.check_tokenizable(tasks, 1 << 20)
    device = gt.resolve_device(args.device)
    model = load_any(args.source).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else None
    result = {}
    if items is not None:
        result["hellaswag"] = _timed(lambda: hellaswag.score(model, items, device, autocast,
                                                               items_per_batch=args.batch_items), len(items))
    if tasks is not None:
        result["core"] = _timed(lambda: core.evaluate(model, tasks, device, autocast), sum(len(t.data) for t in tasks))
    runtime = gt.Runtime(device, args.dtype)
    for spec, cfg in others:
        result[spec.name] = spec.build(cfg, runtime)(model)
    _print_eval(result, args.json)
    return result["hellaswag"] if set(result) == {"hellaswag"} else result


def _timed(fn, n: int) -> dict:
    t0 = time.perf_counter()
    r = fn()
    r["seconds"] = round(time.perf_counter() - t0, 2)
    r["items_per_sec"] = round(n / max(r["seconds"], 1e-9), 2)
    return r


def _print_eval(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result["hellaswag"] if set(result) == {"hellaswag"} else result))
        return
    if "hellaswag" in result:
        r = result["hellaswag"]
        print(f"hellaswag: acc {r['acc']:.4f} | acc_norm {r['acc_norm']:.4f} | n {r['n']} | {r['items_per_sec']} items/s")
    for name, values in result.items():
        if name not in ("hellaswag", "core"):
            print(f"{name}: " + " | ".join(f"{k} {v:.4f}" for k, v in values.items()))
    if "core" in result:
        r = result["core"]
        for label, t in r["tasks"].items():
            print(f"{label:<32} accuracy {t['accuracy']:.4f} | centered {t['centered']:+.4f} | n {t['n']}")
        print(f"CORE {r['core']:.4f} ({len(r['tasks'])} tasks, {r['items_per_sec']} items/s)")


COMMANDS = {"inspect": _inspect, "from-hf": _convert_in, "from-openai": _convert_in, "generate": _generate,
            "to-hf": _export, "to-safetensors": _export, "eval": _eval}


if __name__ == "__main__":
    gt.run_cli(main)
