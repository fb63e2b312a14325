"""Weights in and out of a GPTModel: our checkpoints (whole files, sharded folders, safetensors
exports), OpenAI's TensorFlow GPT-2, Hugging Face folders (gptkit/hf.py), and what the training
scripts start from (`new_model`: fresh, or --init_from any of these). Every reader names the first
tensor that is missing or of the wrong shape in one line; none runs code from a file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from gptkit.checkpoint.state import CheckpointState, DictPart, ModelPart, check_config_matches
from gptkit.checkpoint.store import SHARDED_DONE, dcp_load, load_checkpoint, save_checkpoint
from gptkit.errors import CheckpointError, UserError
from gptkit.files import atomic_write
from gptkit.model import GPTConfig, GPTModel

VOCAB_ROWS = ("wte.weight", "lm_head.weight")  # the tensors whose rows are token ids


def load_into(model: GPTModel, sd: dict[str, torch.Tensor], source: str, check_only: bool = False) -> None:
    """Copy weights into the model, naming the first tensor that is missing or has the wrong shape.
    Token-row tensors may have the model's padded row count or the plain vocabulary's (then only the
    real rows are copied; padded rows are never looked up nor returned as logits). `check_only`: the
    shapes only (meta tensors on either side)."""
    own = model.state_dict()
    if model.cfg.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    _check_tensors(model, own, sd, source)
    if check_only:
        return
    with torch.no_grad():
        for k, v in own.items():
            if k in sd:
                v[: sd[k].shape[0]].copy_(sd[k])


def _check_tensors(model: GPTModel, own: dict, sd: dict, source: str) -> None:
    """One error line for the first tensor the model needs that `sd` lacks, has in another shape, or
    that `sd` has and the model does not."""
    for k, v in own.items():
        if k == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        if k not in sd:
            raise UserError(f"{source} has no tensor {k!r} that the model needs (config mismatch?)")
        unpadded = k in VOCAB_ROWS and tuple(sd[k].shape) == (model.cfg.vocab_size, *v.shape[1:])
        if tuple(sd[k].shape) != tuple(v.shape) and not unpadded:
            raise UserError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, the model expects "
                            f"{tuple(v.shape)}; use the matching --model / config")
    extra = sorted(set(sd) - set(own))
    if extra:
        raise UserError(f"{source} has tensor {extra[0]!r} that the model does not (config mismatch?)")


def unpadded_state_dict(model: GPTModel) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """The model's weights with token rows cut back to the real vocabulary, and the matching config:
    what exports hold, so other tools see a plain 50257-token vocabulary."""
    cfg = model.cfg
    sd = {k: (v[: cfg.vocab_size] if k in VOCAB_ROWS else v) for k, v in model.state_dict().items()}
    return sd, dataclasses.replace(cfg, vocab_multiple=1)


# ----------------------------------------------------------------------------------------------
# Our checkpoints


def load_sharded_weights(path: Path, ckpt: dict) -> GPTModel:
    """The whole model of a sharded (FSDP) checkpoint folder, in this one process: its shards are read
    by torch.distributed.checkpoint into full tensors, whatever number of ranks wrote them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = GPTModel(GPTConfig.from_dict(ckpt["config"]))
    template = {"model": get_model_state_dict(model)}
    dcp_load(template, path)  # data only: a crafted shard index or value is refused, never run
    set_model_state_dict(model, template["model"])
    return model


def load_ours(path) -> tuple[GPTModel, dict]:
    """A GPTModel from a training checkpoint (a .pt file or a sharded checkpoint's folder) or a
    weights-only .safetensors export."""
    path = Path(path)
    if path.is_dir():
        ckpt = load_checkpoint(path)
        model = load_sharded_weights(path, ckpt)
        return model.eval(), {**ckpt, "model": model.state_dict()}
    if path.suffix == ".safetensors":
        ckpt = _read_safetensors(path)
    else:
        ckpt = load_checkpoint(path)
    model = GPTModel(GPTConfig.from_dict(ckpt["config"]))
    load_into(model, ckpt["model"], str(path))
    return model.eval(), ckpt


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({str(e).strip()[:100]})")
    if "gpt_config" not in meta:
        raise CheckpointError(f"{path} has no gpt_config metadata; it was not exported by wt_load.py")
    return {"config": json.loads(meta["gpt_config"]), "model": sd, "step": int(meta.get("step", 0)),
            "tokens_seen": int(meta.get("tokens_seen", 0))}


def is_ours(p: Path) -> bool:
    """A checkpoint file, a sharded checkpoint's folder or a safetensors export of this toolkit."""
    return p.is_file() or (p / SHARDED_DONE).is_file()


def load_any(source: str, what: str = "source") -> GPTModel:
    """Weights from our checkpoint or export, OpenAI's TF folder, a Hugging Face folder, hub id or
    GPT-2 size name. A source that looks like a path but names nothing is one line saying so."""
    from gptkit import hf

    p = Path(source)
    if is_ours(p):
        return load_ours(p)[0]
    if p.is_dir() and (p / "hparams.json").is_file():
        return load_openai(source)
    return hf.load_hf(source, what)


def source_config(source: str, what: str = "--init_from") -> dict:
    """The model config (our form) of a weights source, read without its weights: a checkpoint's header,
    an export's metadata, OpenAI's hparams.json, a Hugging Face folder's config.json (checked against
    its weight files' shapes). What --check and a run check before anything is allocated."""
    from gptkit import hf
    from gptkit.checkpoint.store import peek_checkpoint

    p = Path(source)
    if is_ours(p):
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(p), "pt") as f:
                    meta = f.metadata() or {}
            except Exception as e:
                raise CheckpointError(f"{p} is corrupt or not a safetensors file ({str(e).strip()[:100]})")
            if "gpt_config" not in meta:
                raise CheckpointError(f"{p} has no gpt_config metadata; it was not exported by wt_load.py")
            return json.loads(meta["gpt_config"])
        return peek_checkpoint(p)["config"]
    if p.is_dir() and (p / "hparams.json").is_file():
        hp = json.loads((p / "hparams.json").read_text())
        return GPTConfig(vocab_size=hp["n_vocab"], context_length=hp["n_ctx"], emb_dim=hp["n_embd"],
                         n_heads=hp["n_head"], n_layers=hp["n_layer"], qkv_bias=True).to_dict()
    return hf.hf_source_config(source, what).to_dict()


def source_tokenizer(source: str, what: str = "--init_from"):
    """The tokenizer a weights source carries: a checkpoint's or an export's record (GPT-2's when it
    records none), a Hugging Face folder's tokenizer.json, OpenAI's GPT-2's."""
    from gptkit import hf
    from gptkit.checkpoint.store import peek_checkpoint
    from gptkit.tokenizer import from_record, gpt2

    p = Path(source)
    if is_ours(p):
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                record = (f.metadata() or {}).get("tokenizer")
            return from_record(json.loads(record) if record else None, str(p))
        return from_record((peek_checkpoint(p).get("run") or {}).get("tokenizer"), str(p))
    if p.is_dir() and (p / "hparams.json").is_file():
        return gpt2()
    hf_dir = hf.resolve_hf_dir(source, what)
    return hf.folder_tokenizer(hf_dir, hf.read_config(hf_dir).vocab_size)  # the config only: no shapes yet


def _as_start(src: dict, cfg: GPTConfig) -> dict:
    """A source's config as a start for `cfg`: the padding of its token rows is ours to choose, and so
    is the context where the positions allow it (rotary positions have no table of a fixed length)."""
    out = {**src, "vocab_multiple": cfg.vocab_multiple}
    if src.get("position") == "rotary" and cfg.position == "rotary":
        out["context_length"] = cfg.context_length
    return out


def init_weights(model: GPTModel, source: str) -> None:
    """--init_from: copy pretrained weights (not optimizer or step) into a freshly built model."""
    src = load_any(source, "--init_from")
    # Padding of the token rows may differ: load_into copies the real rows either way.
    check_config_matches(_as_start(src.cfg.to_dict(), model.cfg), model.cfg, source=f"--init_from {source}")
    load_into(model, unpadded_state_dict(src)[0], source)


def new_model(cfg: GPTConfig, init_from: str | None = None, log=print) -> GPTModel:
    """The model a training script starts from: freshly initialised, or with --init_from weights."""
    model = GPTModel(cfg)
    if init_from:
        init_weights(model, init_from)
        log(f"initialised weights from {init_from}")
    return model


def save_from_model(model: GPTModel, out, source: str) -> Path:
    """A weights-only checkpoint (no optimizer or data position): for --init_from, inspect and exports."""
    from gptkit.loop import TrainState
    from gptkit.tokenizer import get_tokenizer

    state = CheckpointState(model.cfg, None, model=ModelPart(model), progress=TrainState(),
                            run=DictPart({"converted_from": source, "tokenizer": get_tokenizer().record()}))
    return save_checkpoint(out, state.state_dict())


def fresh_file(out: Path) -> None:
    """Exports never replace a file: the user's (or an earlier export) is not ours to overwrite."""
    if out.exists():
        raise UserError(f"{out} already exists; pick a new output file (or move the old one away)")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"{out.parent} is a file, not a folder; pick another output path")


def export_safetensors(model: GPTModel, out, ckpt: dict | None = None) -> Path:
    """Weights only (no optimizer state), our names, the config in the metadata. A tied head is stored
    once, as wte.weight (safetensors keeps no shared tensors); GPTModel restores the tie when it loads,
    so `GPTModel(cfg).load_state_dict(load_file(path))` works with strict loading."""
    from safetensors.torch import save

    out = Path(out)
    fresh_file(out)
    sd, cfg = unpadded_state_dict(model)
    sd = {k: v.contiguous() for k, v in sd.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    from gptkit.tokenizer import get_tokenizer

    meta = {"gpt_config": json.dumps(cfg.to_dict()), "step": str((ckpt or {}).get("step", 0)),
            "tokens_seen": str((ckpt or {}).get("tokens_seen", 0)), "tokenizer": json.dumps(get_tokenizer().record())}
    return atomic_write(out, lambda f: f.write(save(sd, metadata=meta)))


# ----------------------------------------------------------------------------------------------
# OpenAI's original TensorFlow checkpoint


def load_openai(ckpt_dir: str) -> GPTModel:
    d = Path(ckpt_dir)
    if not (d / "hparams.json").is_file():
        raise UserError(f"{d} has no hparams.json; it is not an OpenAI GPT-2 checkpoint folder")
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError("reading OpenAI's TensorFlow checkpoint needs tensorflow (pip install tensorflow-cpu); "
                        "or use the Hugging Face format: python wt_load.py from-hf gpt2 OUT")
    hp = json.loads((d / "hparams.json").read_text())
    cfg = GPTConfig(vocab_size=hp["n_vocab"], context_length=hp["n_ctx"], emb_dim=hp["n_embd"], n_heads=hp["n_head"],
                    n_layers=hp["n_layer"], qkv_bias=True)
    ckpt = tf.train.latest_checkpoint(str(d))
    if ckpt is None:
        raise UserError(f"{d} has hparams.json but no model.ckpt.* files")

    def var(name):
        return torch.from_numpy(tf.train.load_variable(ckpt, name).squeeze())

    sd = {"wte.weight": var("model/wte"), "wpe.weight": var("model/wpe"),
          "ln_f.weight": var("model/ln_f/g"), "ln_f.bias": var("model/ln_f/b")}
    for i in range(cfg.n_layers):
        for ln in ("ln_1", "ln_2"):
            sd[f"h.{i}.{ln}.weight"] = var(f"model/h{i}/{ln}/g")
            sd[f"h.{i}.{ln}.bias"] = var(f"model/h{i}/{ln}/b")
        for layer in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            key = f"h.{i}.{layer.replace('/', '.')}"
            sd[f"{key}.weight"] = var(f"model/h{i}/{layer}/w").t().contiguous()  # stored (in, out)
            sd[f"{key}.bias"] = var(f"model/h{i}/{layer}/b")
    model = GPTModel(cfg)
    load_into(model, sd, str(d))
    return model.eval()
