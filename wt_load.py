"""Pretrained GPT-2 weights in, our checkpoints out.

    python wt_load.py inspect runs/simple/ckpt_00000200.pt
    python wt_load.py from-hf openai-community/gpt2 gpt2.pt        # or a local HF dir, or gpt2-medium ...
    python wt_load.py from-openai models/124M gpt2.pt              # OpenAI's TF checkpoint (needs tensorflow)
    python wt_load.py to-hf runs/simple/ckpt_00000200.pt hf_out/   # loads in transformers.GPT2LMHeadModel
    python wt_load.py to-safetensors runs/simple/ckpt_00000200.pt model.safetensors
    python wt_load.py generate gpt2.pt --prompt "Every effort moves you"

Our GPTModel uses Hugging Face's GPT-2 parameter names (minus `transformer.`), with nn.Linear where
GPT-2 has Conv1D, so converting is a rename plus a transpose of four matrices per block.
"""

from __future__ import annotations

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import gpt_train as gt
from gptkit.evals import hellaswag

HF_SIZES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
            "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
# GPT-2 stores these as Conv1D weights, (in, out); nn.Linear wants (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ----------------------------------------------------------------------------------------------
# Hugging Face format in


def config_from_hf(hf: dict) -> gt.GPTConfig:
    missing = [k for k in ("vocab_size", "n_embd", "n_head", "n_layer") if k not in hf]
    if missing:
        raise gt.UserError(f"config.json lacks {', '.join(missing)}; it is not a GPT-2 config")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise gt.UserError(f"config.json has activation_function={act!r}; only GPT-2's tanh GELU (gelu_new) is supported")
    return gt.GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
                        emb_dim=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=0.0,
                        qkv_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def resolve_hf_dir(source: str) -> Path:
    """A local HF GPT-2 dir, or a hub id / size name downloaded (config + weights only) through huggingface_hub."""
    p = Path(source)
    if p.is_dir():
        return p
    if p.exists():
        raise gt.UserError(f"{source} is a file; from-hf needs a Hugging Face model folder or hub id")
    repo = HF_SIZES.get(source, source)
    if "/" not in repo:
        raise gt.UserError(f"unknown GPT-2 size {source!r}: use one of {', '.join(HF_SIZES)}, a hub id like "
                           "openai-community/gpt2, or a local folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise gt.UserError(f"could not get {repo} from the Hugging Face hub ({msg}); without network, download it "
                           "elsewhere and pass the local folder")


def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = hf_dir / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise gt.UserError(f"{path} is corrupt or not a weights file ({str(e).strip()[:100]})")
    raise gt.UserError(f"{hf_dir} has no weights ({' or '.join(WEIGHT_FILES)})")


def hf_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        out[k] = v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v
    return out


VOCAB_ROWS = ("wte.weight", "lm_head.weight")  # the tensors whose rows are token ids


def load_into(model: gt.GPTModel, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights into the model, naming the first tensor that is missing or has the wrong shape.
    Token-row tensors may have the model's padded row count or the plain vocabulary's (then only the
    real rows are copied; padded rows are never looked up nor returned as logits)."""
    own = model.state_dict()
    if model.cfg.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    _check_tensors(model, own, sd, source)
    with torch.no_grad():
        for k, v in own.items():
            if k in sd:
                v[: sd[k].shape[0]].copy_(sd[k])


def _check_tensors(model: gt.GPTModel, own: dict, sd: dict, source: str) -> None:
    """One error line for the first tensor the model needs that `sd` lacks, has in another shape, or
    that `sd` has and the model does not."""
    for k, v in own.items():
        if k == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        if k not in sd:
            raise gt.UserError(f"{source} has no tensor {k!r} that the model needs (config mismatch?)")
        unpadded = k in VOCAB_ROWS and tuple(sd[k].shape) == (model.cfg.vocab_size, *v.shape[1:])
        if tuple(sd[k].shape) != tuple(v.shape) and not unpadded:
            raise gt.UserError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, the model expects "
                               f"{tuple(v.shape)}; use the matching --model / config")
    extra = sorted(set(sd) - set(own))
    if extra:
        raise gt.UserError(f"{source} has tensor {extra[0]!r} that the model does not (config mismatch?)")


def unpadded_state_dict(model: gt.GPTModel) -> tuple[dict[str, torch.Tensor], gt.GPTConfig]:
    """The model's weights with token rows cut back to the real vocabulary, and the matching config:
    what exports hold, so other tools see a plain 50257-token GPT-2."""
    cfg = model.cfg
    sd = {k: (v[: cfg.vocab_size] if k in VOCAB_ROWS else v) for k, v in model.state_dict().items()}
    return sd, dataclasses.replace(cfg, vocab_multiple=1)


def load_hf(source: str) -> gt.GPTModel:
    hf_dir = resolve_hf_dir(source)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise gt.UserError(f"{hf_dir} has no config.json; it is not a Hugging Face GPT-2 folder")
    try:
        hf_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise gt.UserError(f"{cfg_path} is not valid JSON ({str(e)[:80]})")
    if not isinstance(hf_cfg, dict):
        raise gt.UserError(f"{cfg_path} holds {type(hf_cfg).__name__}, not a JSON object; it is not a GPT-2 config")
    try:
        cfg = config_from_hf(hf_cfg)
    except gt.UserError as e:
        raise gt.UserError(f"{cfg_path}: {e}")
    sd = hf_to_ours(read_hf_state_dict(hf_dir))
    model = gt.GPTModel(cfg)
    load_into(model, sd, str(hf_dir))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# OpenAI's original TensorFlow checkpoint


def load_openai(ckpt_dir: str) -> gt.GPTModel:
    d = Path(ckpt_dir)
    if not (d / "hparams.json").is_file():
        raise gt.UserError(f"{d} has no hparams.json; it is not an OpenAI GPT-2 checkpoint folder")
    try:
        import tensorflow as tf
    except ImportError:
        raise gt.UserError("reading OpenAI's TensorFlow checkpoint needs tensorflow (pip install tensorflow-cpu); "
                           "or use the Hugging Face format: python wt_load.py from-hf gpt2 OUT")
    hp = json.loads((d / "hparams.json").read_text())
    cfg = gt.GPTConfig(vocab_size=hp["n_vocab"], context_length=hp["n_ctx"], emb_dim=hp["n_embd"], n_heads=hp["n_head"],
                       n_layers=hp["n_layer"], qkv_bias=True)
    ckpt = tf.train.latest_checkpoint(str(d))
    if ckpt is None:
        raise gt.UserError(f"{d} has hparams.json but no model.ckpt.* files")

    def var(name):
        return torch.from_numpy(tf.train.load_variable(ckpt, name).squeeze())

    sd = {"wte.weight": var("model/wte"), "wpe.weight": var("model/wpe"),
          "ln_f.weight": var("model/ln_f/g"), "ln_f.bias": var("model/ln_f/b")}
    for i in range(cfg.n_layers):
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            sd[f"h.{i}.{ours}.weight"] = var(f"model/h{i}/{theirs}/g")
            sd[f"h.{i}.{ours}.bias"] = var(f"model/h{i}/{theirs}/b")
        for layer in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            key = f"h.{i}.{layer.replace('/', '.')}"
            sd[f"{key}.weight"] = var(f"model/h{i}/{layer}/w").t().contiguous()  # stored (in, out)
            sd[f"{key}.bias"] = var(f"model/h{i}/{layer}/b")
    model = gt.GPTModel(cfg)
    load_into(model, sd, str(d))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Our checkpoints


def load_sharded_weights(path: Path, ckpt: dict) -> gt.GPTModel:
    """The whole model of a sharded (FSDP) checkpoint folder, in this one process: its shards are read
    by torch.distributed.checkpoint into full tensors, whatever number of ranks wrote them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = gt.GPTModel(gt.GPTConfig.from_dict(ckpt["config"]))
    template = {"model": get_model_state_dict(model)}
    gt.dcp_load(template, path)  # data only: a crafted shard index or value is refused, never run
    set_model_state_dict(model, template["model"])
    return model


def load_ours(path) -> tuple[gt.GPTModel, dict]:
    """A GPTModel from a training checkpoint (a .pt file or a sharded checkpoint's folder) or a
    weights-only .safetensors export."""
    path = Path(path)
    if path.is_dir():
        ckpt = gt.load_checkpoint(path)
        model = load_sharded_weights(path, ckpt)
        return model.eval(), {**ckpt, "model": model.state_dict()}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise gt.CheckpointError(f"{path} is corrupt or not a safetensors file ({str(e).strip()[:100]})")
        if "gpt_config" not in meta:
            raise gt.CheckpointError(f"{path} has no gpt_config metadata; it was not exported by wt_load.py")
        ckpt = {"config": json.loads(meta["gpt_config"]), "model": sd, "step": int(meta.get("step", 0)),
                "tokens_seen": int(meta.get("tokens_seen", 0))}
    else:
        ckpt = gt.load_checkpoint(path)
    model = gt.GPTModel(gt.GPTConfig.from_dict(ckpt["config"]))
    load_into(model, ckpt["model"], str(path))
    return model.eval(), ckpt


def load_any(source: str) -> gt.GPTModel:
    """Weights from a GPT-2 size name, hub id, HF folder, OpenAI folder, our checkpoint or export."""
    p = Path(source)
    if p.is_file() or (p / gt.SHARDED_DONE).is_file():
        return load_ours(p)[0]
    if p.is_dir() and (p / "hparams.json").is_file():
        return load_openai(source)
    return load_hf(source)


def init_weights(model: gt.GPTModel, source: str) -> None:
    """--init_from: copy pretrained weights (not optimizer or step) into a freshly built model."""
    src = load_any(source)
    # Padding of the token rows may differ: load_into copies the real rows either way.
    gt.check_config_matches({**src.cfg.to_dict(), "vocab_multiple": model.cfg.vocab_multiple}, model.cfg,
                            source=f"--init_from {source}")
    load_into(model, unpadded_state_dict(src)[0], source)


def new_model(cfg: gt.GPTConfig, init_from: str | None = None, log=print) -> gt.GPTModel:
    """The model a training script starts from: freshly initialised, or with --init_from weights."""
    model = gt.GPTModel(cfg)
    if init_from:
        init_weights(model, init_from)
        log(f"initialised weights from {init_from}")
    return model


def save_from_model(model: gt.GPTModel, out, source: str) -> Path:
    """A weights-only checkpoint (no optimizer or data position): for --init_from, inspect and exports."""
    state = gt.CheckpointState(model.cfg, None, model=gt.ModelPart(model), progress=gt.TrainState(),
                               run=gt.DictPart({"converted_from": source}))
    return gt.save_checkpoint(out, state.state_dict())


# ----------------------------------------------------------------------------------------------
# Export


def ours_to_hf(model: gt.GPTModel) -> dict[str, torch.Tensor]:
    if not gt.attention_spec(model.cfg.attention).hf:
        raise gt.UserError(f"this model's attention ({model.cfg.attention}) is not GPT-2's, so it has no Hugging Face "
                           "GPT-2 form; export it with to-safetensors instead")
    sd, cfg = unpadded_state_dict(model)
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            if cfg.tie_embeddings:
                continue  # transformers re-ties it to wte
            out[k] = v.contiguous()
            continue
        out[f"transformer.{k}"] = (v.t() if k.endswith(CONV1D_SUFFIXES) else v).contiguous()
    if not cfg.qkv_bias:  # GPT-2 always has the bias: a zero one is the same function
        for i in range(cfg.n_layers):
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.emb_dim)
    return out


def hf_config(cfg: gt.GPTConfig) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
            "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "resid_pdrop": cfg.drop_rate,
            "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": gt.EOT_ID, "eos_token_id": gt.EOT_ID,
            "torch_dtype": "float32"}


def hf_tokenizer_files(folder: Path, context_length: int) -> None:
    """GPT-2's tokenizer as transformers reads it: the same two files our tokenizer is built from
    (vocab.json is encoder.json, merges.txt is vocab.bpe), its special token and its settings."""
    bpe, enc = gt.gpt2_bpe_files()
    shutil.copyfile(enc, folder / "vocab.json")
    shutil.copyfile(bpe, folder / "merges.txt")
    eot = gt.EOT_TOKEN
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "add_prefix_space": False,
        "add_bos_token": False, "errors": "replace", "clean_up_tokenization_spaces": False, **special,
        "added_tokens_decoder": {str(gt.EOT_ID): {"content": eot, "special": True, "lstrip": False, "rstrip": False,
                                                  "normalized": True, "single_word": False}}}, indent=2))
    # GPT-2 has no padding token: generation pads with end-of-text, as transformers does for GPT-2.
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": gt.EOT_ID, "eos_token_id": gt.EOT_ID, "pad_token_id": gt.EOT_ID, "do_sample": False},
        indent=2))


def _card_facts(ckpt: dict):
    """From a checkpoint: its run record, the run's settings, the data it named, and last(key), the
    final recorded value of a loss history ("not recorded" when there is none)."""
    run = ckpt.get("run") or {}
    args = run.get("args") or {}
    history = (ckpt.get("progress") or {}).get("history") or {}
    data = (args.get("data") or args.get("data_dir") or "the embedded Project Gutenberg sample") if args else "unknown"

    def last(key: str) -> str:
        return f"{history[key][-1]:.4f}" if history.get(key) else "not recorded"
    return run, args, data, last


def model_card(cfg: gt.GPTConfig, ckpt: dict | None, source: str) -> str:
    """README.md of an export: what the model is, what it was trained on, how far, and how it was made."""
    ckpt = ckpt or {}
    run, args, data, last = _card_facts(ckpt)
    params = gt.count_parameters_from_config(cfg)["total"]
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, causal-lm]
---

# GPT-2 ({params / 1e6:.1f}M parameters) pretrained with this toolkit

A GPT-2 architecture model ({cfg.n_layers} layers, {cfg.emb_dim} wide, {cfg.n_heads} heads, context
{cfg.context_length}, vocabulary {cfg.vocab_size}, GPT-2's BPE tokenizer) trained from scratch.

| | |
| --- | --- |
| trained on | {data} |
| steps | {ckpt.get("step", 0):,} |
| tokens seen | {ckpt.get("tokens_seen", 0):,} |
| final train loss | {last("train_loss")} |
| final validation loss | {last("val_loss")} |
| optimizer | {run.get("optimizer") or args.get("optimizer") or "unknown"} |
| training script | {run.get("script", "unknown")} (run {ckpt.get("run_id") or "unknown"}) |

Made with `python wt_load.py to-hf {Path(source).name} OUT_DIR` on {time.strftime("%Y-%m-%d")}. Load it with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)`.

## Config

```json
{json.dumps(cfg.to_dict(), indent=2)}
```

## Training settings

```json
{json.dumps(args, indent=2, sort_keys=True, default=str)}
```
"""


def _fresh_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise gt.UserError(f"{out} already exists and is not an empty folder; pick a new output folder")


def _fresh_file(out: Path) -> None:
    """Exports never replace a file: the user's (or an earlier export) is not ours to overwrite."""
    if out.exists():
        raise gt.UserError(f"{out} already exists; pick a new output file (or move the old one away)")
    if out.parent.exists() and not out.parent.is_dir():
        raise gt.UserError(f"{out.parent} is a file, not a folder; pick another output path")


def export_hf(model: gt.GPTModel, out_dir, ckpt: dict | None = None, source: str = "CHECKPOINT") -> Path:
    """A Hugging Face GPT-2 folder (config, weights, tokenizer, generation config, model card),
    written to a temp folder and renamed into place, so a failure leaves nothing half-written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    _fresh_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = ours_to_hf(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, gt.dir_mode())  # mkdtemp makes 0700: give the folder normal permissions
        cfg = unpadded_state_dict(model)[1]
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
        hf_tokenizer_files(tmp, cfg.context_length)
        (tmp / "README.md").write_text(model_card(cfg, ckpt, source))
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", gt.file_mode())  # safetensors writes 0600
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = gt.full_disk_cause(e)
        if full is not None:
            raise gt.disk_full(out, full, sum(v.numel() * v.element_size() for v in weights.values())) from None
        raise
    return out


def export_safetensors(model: gt.GPTModel, out, ckpt: dict | None = None) -> Path:
    """Weights only (no optimizer state), our names, the config in the metadata. A tied head is stored
    once, as wte.weight (safetensors keeps no shared tensors); GPTModel restores the tie when it loads,
    so `GPTModel(cfg).load_state_dict(load_file(path))` works with strict loading."""
    from safetensors.torch import save

    out = Path(out)
    _fresh_file(out)
    sd, cfg = unpadded_state_dict(model)
    sd = {k: v.contiguous() for k, v in sd.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    meta = {"gpt_config": json.dumps(cfg.to_dict()), "step": str((ckpt or {}).get("step", 0)),
            "tokens_seen": str((ckpt or {}).get("tokens_seen", 0))}
    return gt.atomic_write(out, lambda f: f.write(save(sd, metadata=meta)))


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


def build_parser() -> argparse.ArgumentParser:
    fmt = gt.HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=gt.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="print what a checkpoint holds", formatter_class=fmt)
    s.add_argument("path", help="a checkpoint (.pt), a sharded checkpoint's folder or a weights export (.safetensors)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("from-hf", help="Hugging Face GPT-2 (folder, hub id or size name) -> our checkpoint",
                       formatter_class=fmt)
    s.add_argument("source", help=f"HF folder, hub id, or one of {', '.join(HF_SIZES)}")
    s.add_argument("out", help="checkpoint file to write (.pt)")
    s = sub.add_parser("from-openai", help="OpenAI's TF checkpoint folder -> our checkpoint", formatter_class=fmt)
    s.add_argument("source", help="folder with hparams.json and model.ckpt.*")
    s.add_argument("out", help="checkpoint file to write (.pt)")
    s = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face GPT-2 folder", formatter_class=fmt)
    s.add_argument("checkpoint", help="a training checkpoint (.pt or a sharded checkpoint's folder) of either script")
    s.add_argument("out_dir", help="new folder for config.json + model.safetensors")
    s = sub.add_parser("to-safetensors", help="our checkpoint -> weights-only .safetensors", formatter_class=fmt)
    s.add_argument("checkpoint", help="a training checkpoint (.pt or a sharded checkpoint's folder)")
    s.add_argument("out", help=".safetensors file to write")
    s = sub.add_parser("generate", help="generate text from any weights this tool reads", formatter_class=fmt)
    s.add_argument("source", help="checkpoint, .safetensors, HF folder or GPT-2 size name")
    s.add_argument("--prompt", default="Every effort moves you", help="text to continue (empty: from <|endoftext|>)")
    s.add_argument("--max_new_tokens", type=int, default=50, help="tokens to generate (at least 1)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; above 0 samples")
    s.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens (at least 1)")
    s.add_argument("--seed", type=int, default=123, help="sampling seed")
    s = sub.add_parser("eval", help="score any weights on HellaSwag exactly as lm-evaluation-harness does",
                       formatter_class=fmt)
    s.add_argument("source", help="checkpoint, sharded checkpoint folder, .safetensors, HF folder or GPT-2 size name")
    s.add_argument("--hellaswag", type=Path, required=True,
                   help=f"HellaSwag's hellaswag_val.jsonl (from {hellaswag.HELLASWAG_URL})")
    s.add_argument("--limit", type=int, default=None, help="score only the first N items (default: all)")
    s.add_argument("--batch_items", type=int, default=8, help="items per forward pass (each with its 4 endings)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    s.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="precision of the forward pass")
    s.add_argument("--json", action="store_true", help="print the result as JSON only")
    return p


GENERATE_RULES = [
    ("max_new_tokens", lambda v: v >= 1, "at least 1"),
    ("temperature", lambda v: gt.finite(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    ("top_k", lambda v: v is None or v >= 1, "at least 1"),
    ("seed", lambda v: 0 <= v < 2**32, "a whole number from 0 to 4294967295"),
    ("limit", lambda v: v is None or v >= 1, "at least 1"),
    ("batch_items", lambda v: v >= 1, "at least 1"),
]


def _check(args) -> None:
    for name, ok, what in GENERATE_RULES:
        if hasattr(args, name) and not ok(getattr(args, name)):
            raise gt.UserError(f"--{name} must be {what}, got {getattr(args, name)}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    _check(args)
    return COMMANDS[args.command](args)


def _inspect(args) -> dict:
    info = describe_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>15}: {json.dumps(v) if isinstance(v, dict) else v}")
    return info


def _convert_in(args) -> Path:
    _fresh_file(Path(args.out))
    model = load_hf(args.source) if args.command == "from-hf" else load_openai(args.source)
    out = save_from_model(model, args.out, args.source)
    print(f"wrote {out} ({gt.count_parameters(model)['total'] / 1e6:.1f}M parameters)")
    return out


def _generate(args) -> str:
    model = load_any(args.source)
    torch.manual_seed(args.seed)
    return gt.generate_and_print_sample(model, gt.get_tokenizer(), "cpu", args.prompt, args.max_new_tokens,
                                        args.temperature, args.top_k, args.seed)


def _export(args) -> Path:
    model, ckpt = load_ours(args.checkpoint)
    if args.command == "to-hf":
        out = export_hf(model, args.out_dir, ckpt, args.checkpoint)
    else:
        out = export_safetensors(model, args.out, ckpt)
    print(f"wrote {out}")
    return out


def _eval(args) -> dict:
    items = hellaswag.read_items(args.hellaswag, args.limit)  # before the model: a bad file fails fast
    device = gt.resolve_device(args.device)
    model = load_any(args.source).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else None
    t0 = time.perf_counter()
    result = hellaswag.score(model, items, device, autocast, items_per_batch=args.batch_items)
    result["items_per_sec"] = round(result["n"] / (time.perf_counter() - t0), 2)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"hellaswag: acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | n {result['n']} | "
              f"{result['items_per_sec']} items/s")
    return result


COMMANDS = {"inspect": _inspect, "from-hf": _convert_in, "from-openai": _convert_in, "generate": _generate,
            "to-hf": _export, "to-safetensors": _export, "eval": _eval}


if __name__ == "__main__":
    gt.run_cli(main)
