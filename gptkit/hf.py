"""Hugging Face's formats, both ways: a model whose parts one of transformers' architectures represents
exactly is exported as that architecture and read back from it (for continued pretraining):

    GPT-2's parts (learned positions, LayerNorm, GELU)          -> GPT2LMHeadModel
    rotary, RMSNorm, SwiGLU                                      -> LlamaForCausalLM
    the same with QK-norm (RMSNorm over each head's q and k,
      before rotary, as Qwen3 places it)                         -> Qwen3ForCausalLM

Any other combination (nanochat's `modern` block: ReLU^2 MLP, a norm after the embedding) is refused
in one line naming the part that has no equivalent; to-safetensors keeps every model. Weights keep
our names inside the toolkit (GPT-2's), so converting is a renaming plus: GPT-2's Conv1D matrices
transposed, c_attn split into q/k/v projections and c_fc into gate/up for Llama and Qwen3.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from gptkit.attention import attention_spec
from gptkit.errors import UserError
from gptkit.files import could_be_hub_id, dir_mode, disk_full, file_mode, full_disk_cause, no_such_path
from gptkit.model import GPTConfig, GPTModel, count_parameters_from_config
from gptkit.parts import NORMS, POSITIONS, part_settings
from gptkit.tokenizer import EOT_ID, EOT_TOKEN, gpt2_bpe_files
from gptkit.weights import load_into, unpadded_state_dict

HF_SIZES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
            "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
# GPT-2 stores these as Conv1D weights, (in, out); nn.Linear wants (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Rotary positions run at any length: an export says this many (or the training context, if longer), so
# transformers does not warn on a prompt past the short context it was trained at; the card says that one.
ROTARY_EXPORT_POSITIONS = 8192


# ----------------------------------------------------------------------------------------------
# Which architecture represents a config


def hf_architecture(cfg: GPTConfig) -> str:
    """gpt2, llama or qwen3: the transformers architecture that computes exactly what `cfg` does, or
    one error line naming the first part that none of them has."""
    if not attention_spec(cfg.attention).hf:
        _no_equivalent(f"--attention {cfg.attention}")
    if cfg.embed_norm:
        _no_equivalent("--embed_norm (a norm right after the token embedding)")
    if cfg.position == "learned":
        for ok, part in ((cfg.norm == "layernorm", f"--norm {cfg.norm} with learned positions"),
                         (cfg.mlp == "gelu", f"--mlp {cfg.mlp} with learned positions"),
                         (not cfg.qk_norm, "--qk_norm with learned positions"),
                         (cfg.kv_heads == cfg.n_heads, "--n_kv_heads with learned positions")):
            if not ok:
                _no_equivalent(part, "GPT-2 has LayerNorm, a GELU MLP, no QK-norm and one key/value head per query head")
        return "gpt2"
    if cfg.position != "rotary":
        _no_equivalent(f"--position {cfg.position}")
    for ok, part in ((cfg.norm == "rmsnorm", f"--norm {cfg.norm} with rotary positions"),
                     (cfg.mlp == "swiglu", f"--mlp {cfg.mlp}"),
                     (cfg.qkv_bias == cfg.bias, "a q/k/v bias without the other biases (or the reverse)")):
        if not ok:
            _no_equivalent(part, "Llama and Qwen3 have RMSNorm and a SwiGLU MLP")
    return "qwen3" if cfg.qk_norm else "llama"


def _no_equivalent(part: str, why: str = "") -> None:
    raise UserError(f"this model's {part} has no Hugging Face equivalent" + (f" ({why})" if why else "")
                    + "; export it with to-safetensors instead, which keeps every part")


# ----------------------------------------------------------------------------------------------
# Configs


def hf_config(cfg: GPTConfig) -> dict:
    from gptkit.tokenizer import get_tokenizer

    arch, doc = hf_architecture(cfg), get_tokenizer().eot_token  # the document token: bos, eos and pad
    common = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": doc, "eos_token_id": doc,
              "pad_token_id": doc, "initializer_range": 0.02, "dtype": "float32",
              "transformers_version": _transformers_version()}
    if arch == "gpt2":
        return {**common, "activation_function": "gelu_new", "n_positions": cfg.context_length,
                "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": None, "layer_norm_epsilon": 1e-5, "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate,
                "attn_pdrop": cfg.drop_rate, "scale_attn_weights": True}
    base = part_settings(cfg, POSITIONS, "rotary").base
    return {**common, "hidden_size": cfg.emb_dim, "intermediate_size": _swiglu_hidden(cfg),
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": max(cfg.context_length, ROTARY_EXPORT_POSITIONS),
            "rms_norm_eps": part_settings(cfg, NORMS, "rmsnorm").eps,
            "rope_theta": base, "rope_parameters": {"rope_theta": base, "rope_type": "default"}, "rope_scaling": None,
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": 0.0, "use_cache": True}


def _transformers_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _swiglu_hidden(cfg: GPTConfig) -> int:
    from gptkit.parts.swiglu import hidden_width

    return hidden_width(cfg)


GPT2_VOCAB = 50257  # the ids of the one tokenizer the toolkit speaks (gptkit/tokenizer.py)


def config_from_hf(hf: dict) -> GPTConfig:
    """Our config of a Hugging Face config.json (GPT-2, Llama, Qwen3, or Mistral without a sliding
    window, which computes what Llama does)."""
    kind = hf.get("model_type", "gpt2")
    if kind == "mistral":
        window, longest = hf.get("sliding_window"), hf.get("max_position_embeddings", 0)
        if window is not None and window < longest:
            raise UserError(f"config.json is a Mistral model with a sliding window of {window} tokens (shorter than its "
                            f"{longest} positions); only a Mistral without one computes what Llama does, which this "
                            "toolkit reads")
        kind = "llama"
    if kind == "gpt2":
        cfg = _gpt2_config(hf)
    elif kind in ("llama", "qwen3"):
        cfg = _llama_config({**hf, "model_type": kind}, qk_norm=kind == "qwen3")
    else:
        raise UserError(f"config.json is a {str(kind)[:40]!r} model; this toolkit reads GPT-2, Llama, Qwen3 and Mistral "
                        "(without a sliding window) folders")
    return cfg


def _is_gpt2(tok) -> bool:
    """Whether a folder's tokenizer is GPT-2's: the same 50,257 tokens with the same ids."""
    if tok.n_vocab != GPT2_VOCAB or not hasattr(tok, "tok"):
        return False
    return tok.tok.get_vocab(with_added_tokens=True) == json.loads(gpt2_bpe_files()[1].read_text(encoding="utf-8"))


def folder_tokenizer(hf_dir: Path, vocab_size: int):
    """The tokenizer of a Hugging Face model folder: its tokenizer.json; without one, GPT-2's when the
    model has GPT-2's vocabulary (OpenAI's GPT-2 folders ship only vocab.json and merges.txt). A
    tokenizer with more ids than the model has rows is refused (its ids would index past the table)."""
    from gptkit.tokenizer import gpt2, load_tokenizer

    if (hf_dir / "tokenizer.json").is_file():
        tok = load_tokenizer(hf_dir, "the model folder")
        if _is_gpt2(tok):
            tok = gpt2()  # GPT-2's own (an export of this toolkit, OpenAI's folders): the same ids, the same caches
    elif vocab_size == GPT2_VOCAB:
        tok = gpt2()
    else:
        raise UserError(f"{hf_dir} has a {vocab_size:,}-token vocabulary and no tokenizer.json; its token ids cannot be "
                        "read as text (copy the model's tokenizer.json into the folder)")
    if tok.n_vocab > vocab_size:
        raise UserError(f"{hf_dir}: its tokenizer has {tok.n_vocab:,} ids, more than the model's {vocab_size:,} rows")
    return tok


def _gpt2_config(hf: dict) -> GPTConfig:
    missing = [k for k in ("vocab_size", "n_embd", "n_head", "n_layer") if k not in hf]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)}; it is not a GPT-2 config")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"config.json has activation_function={act!r}; only GPT-2's tanh GELU (gelu_new) is supported")
    return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
                     emb_dim=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=0.0,
                     qkv_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def _llama_config(hf: dict, qk_norm: bool) -> GPTConfig:
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)}; it is not a {hf['model_type']} config")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    for ok, what in ((hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} (only silu)"),
                     (hf.get("head_dim") in (None, width // heads), f"head_dim={hf.get('head_dim')} (only "
                                                                    "hidden_size / num_attention_heads)"),
                     (rope.get("rope_type", rope.get("type", "default")) == "default", f"rope scaling {rope}"),
                     (hf.get("attention_bias", False) == hf.get("mlp_bias", False), "attention_bias != mlp_bias"),
                     (not hf.get("use_sliding_window"), "sliding-window attention")):
        if not ok:
            raise UserError(f"config.json has {what}, which this toolkit's parts do not represent")
    kv = hf.get("num_key_value_heads") or heads
    base = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    bias = bool(hf.get("attention_bias", False))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] <= 0:
            raise UserError(f"config.json has {key}={str(hf[key])[:40]}; it must be a positive whole number")
    cfg = GPTConfig(vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
                    emb_dim=width, n_heads=heads, n_layers=hf["num_hidden_layers"], n_kv_heads=None if kv == heads else kv,
                    position="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=qk_norm, bias=bias, qkv_bias=bias,
                    tie_embeddings=hf.get("tie_word_embeddings", False), drop_rate=0.0,
                    parts={"rotary": {"base": base}, "rmsnorm": {"affine": True, "eps": hf.get("rms_norm_eps", 1e-6)},
                           "swiglu": {"hidden": None}})
    if _swiglu_hidden(cfg) != hf["intermediate_size"]:  # recorded as our own flags record it: None is the default
        cfg.parts["swiglu"]["hidden"] = hf["intermediate_size"]
    return cfg


# ----------------------------------------------------------------------------------------------
# Weights


def ours_to_hf(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under the exported architecture's names and layout."""
    arch = hf_architecture(model.cfg)
    sd, cfg = unpadded_state_dict(model)
    out = _gpt2_weights_out(sd, cfg) if arch == "gpt2" else _llama_weights_out(sd, cfg)
    return {k: v.contiguous() for k, v in out.items()}


def _gpt2_weights_out(sd: dict, cfg: GPTConfig) -> dict:
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            if not cfg.tie_embeddings:  # a tied head: transformers re-ties it to wte
                out[k] = v
            continue
        out[f"transformer.{k}"] = v.t() if k.endswith(CONV1D_SUFFIXES) else v
    # GPT-2 always has its biases: a zero one computes the same function.
    for name, width in (("attn.c_attn", 3 * cfg.emb_dim), ("attn.c_proj", cfg.emb_dim), ("mlp.c_fc", 4 * cfg.emb_dim),
                        ("mlp.c_proj", cfg.emb_dim), ("ln_1", cfg.emb_dim), ("ln_2", cfg.emb_dim)):
        for i in range(cfg.n_layers):
            out.setdefault(f"transformer.h.{i}.{name}.bias", torch.zeros(width))
    out.setdefault("transformer.ln_f.bias", torch.zeros(cfg.emb_dim))
    return out


def _llama_weights_out(sd: dict, cfg: GPTConfig) -> dict:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": _gain(sd, "ln_f", cfg.emb_dim)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        h, o = f"h.{i}.", f"model.layers.{i}."
        out[o + "input_layernorm.weight"] = _gain(sd, h + "ln_1", cfg.emb_dim)
        out[o + "post_attention_layernorm.weight"] = _gain(sd, h + "ln_2", cfg.emb_dim)
        for kind in ("weight", "bias"):
            if h + f"attn.c_attn.{kind}" in sd:
                for name, t in zip(("q_proj", "k_proj", "v_proj"), sd[h + f"attn.c_attn.{kind}"].split((q, kv, kv))):
                    out[o + f"self_attn.{name}.{kind}"] = t
                gate, up = sd[h + f"mlp.c_fc.{kind}"].chunk(2)
                out[o + f"mlp.gate_proj.{kind}"], out[o + f"mlp.up_proj.{kind}"] = gate, up
                out[o + f"self_attn.o_proj.{kind}"] = sd[h + f"attn.c_proj.{kind}"]
                out[o + f"mlp.down_proj.{kind}"] = sd[h + f"mlp.c_proj.{kind}"]
        if cfg.qk_norm:
            out[o + "self_attn.q_norm.weight"] = _gain(sd, h + "attn.q_norm", cfg.head_dim)
            out[o + "self_attn.k_norm.weight"] = _gain(sd, h + "attn.k_norm", cfg.head_dim)
    return out


def _gain(sd: dict, name: str, width: int) -> torch.Tensor:
    """An RMSNorm's gain; a norm without one (--no-rmsnorm_affine) is the same as a gain of ones."""
    return sd.get(f"{name}.weight", torch.ones(width))


def hf_to_ours(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict under our names and layout (for the config `config_from_hf` made)."""
    if cfg.position == "learned":
        out = {}
        for k, v in sd.items():
            k = k.removeprefix("transformer.")
            if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
                continue
            out[k] = v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v
        return out
    return _llama_weights_in(sd, cfg)


def _llama_weights_in(sd: dict, cfg: GPTConfig) -> dict:
    out = {"wte.weight": sd.get("model.embed_tokens.weight"), "ln_f.weight": sd.get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd.get("lm_head.weight")
    for i in range(cfg.n_layers):
        h, o = f"h.{i}.", f"model.layers.{i}."
        out[h + "ln_1.weight"] = sd.get(o + "input_layernorm.weight")
        out[h + "ln_2.weight"] = sd.get(o + "post_attention_layernorm.weight")
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            parts = [sd.get(o + f"self_attn.{n}.{kind}") for n in ("q_proj", "k_proj", "v_proj")]
            out[h + f"attn.c_attn.{kind}"] = torch.cat(parts) if all(p is not None for p in parts) else None
            gate, up = sd.get(o + f"mlp.gate_proj.{kind}"), sd.get(o + f"mlp.up_proj.{kind}")
            out[h + f"mlp.c_fc.{kind}"] = torch.cat((gate, up)) if gate is not None and up is not None else None
            out[h + f"attn.c_proj.{kind}"] = sd.get(o + f"self_attn.o_proj.{kind}")
            out[h + f"mlp.c_proj.{kind}"] = sd.get(o + f"mlp.down_proj.{kind}")
        if cfg.qk_norm:
            out[h + "attn.q_norm.weight"] = sd.get(o + "self_attn.q_norm.weight")
            out[h + "attn.k_norm.weight"] = sd.get(o + "self_attn.k_norm.weight")
    missing = sorted(k for k, v in out.items() if v is None)
    if missing:
        raise UserError(f"the Hugging Face weights lack what our {missing[0]!r} is made from; is config.json theirs?")
    return out


# ----------------------------------------------------------------------------------------------
# Folders in


def resolve_hf_dir(source: str, what: str = "source") -> Path:
    """A local Hugging Face model folder, or a hub id / GPT-2 size name downloaded (config and weights
    only) through huggingface_hub. A source that looks like a path (or cannot be a hub id) and names
    nothing on disk is reported as a missing path, not as a failed hub lookup."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"{what} {source} is a file; give a Hugging Face model folder, a hub id or a checkpoint")
    if source not in HF_SIZES and not could_be_hub_id(source):
        raise no_such_path(what, source)
    repo = HF_SIZES.get(source, source)
    if "/" not in repo:
        raise UserError(f"{what} {source}: no such file or folder, and not a GPT-2 size ({', '.join(HF_SIZES)}) or a "
                        "hub id like openai-community/gpt2")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors", "tokenizer.json",
                                                            "tokenizer_config.json", "special_tokens_map.json"]))
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {source} is not a file or folder here, and getting it from the Hugging Face hub "
                        f"failed ({msg}); without network, download it elsewhere and pass the local folder")


def read_hf_state_dict(hf_dir: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The folder's weights; with `shapes_only` as meta tensors of their shapes, read from the file's
    header (a safetensors file) or memory-mapped (a pytorch_model.bin), without loading any data."""
    import warnings

    for name in WEIGHT_FILES:
        path = hf_dir / name
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():  # torch's notes on old formats: the refusal is the one line
                warnings.simplefilter("ignore")
                return _read_weights(path, shapes_only)
        except Exception as e:
            raise UserError(f"{path} is corrupt or not a weights file ({str(e).strip().splitlines()[0][:100]})")
    raise UserError(f"{hf_dir} has no weights ({' or '.join(WEIGHT_FILES)})")


def _read_weights(path: Path, shapes_only: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        if shapes_only:
            with safe_open(str(path), "pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("it holds no state dict of tensors")
    return {k: torch.empty(v.shape, device="meta") for k, v in sd.items()} if shapes_only else sd


def hf_source_config(source: str, what: str = "source") -> GPTConfig:
    """The config of a Hugging Face folder (or hub id), checked against its weight files' shapes and
    against this machine's memory, before anything is allocated."""
    hf_dir = resolve_hf_dir(source, what)
    cfg = read_config(hf_dir)
    with torch.device("meta"):
        shell = GPTModel(cfg)  # shapes only: no memory
    try:
        load_into(shell, hf_to_ours(read_hf_state_dict(hf_dir, shapes_only=True), cfg), str(hf_dir), check_only=True)
    except (UserError, RuntimeError) as e:
        raise UserError(f"{hf_dir}: its config.json and its weights disagree ({str(e).splitlines()[0][:200]})")
    return cfg


def read_config(hf_dir: Path) -> GPTConfig:
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{hf_dir} has no config.json; it is not a Hugging Face model folder")
    try:
        hf_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({str(e)[:80]})")
    if not isinstance(hf_cfg, dict):
        raise UserError(f"{cfg_path} holds {type(hf_cfg).__name__}, not a JSON object; it is not a model config")
    try:
        return config_from_hf(hf_cfg)
    except UserError as e:
        raise UserError(f"{cfg_path}: {e}")


def load_hf(source: str, what: str = "source") -> GPTModel:
    """Our model from a Hugging Face GPT-2, Llama or Qwen3 folder (or hub id), with the same logits.
    The config is checked against the weights' shapes and the machine's memory before allocating."""
    from gptkit.planner import machine_memory

    hf_dir = resolve_hf_dir(source, what)
    cfg = hf_source_config(str(hf_dir), what)
    need = 2 * 4 * count_parameters_from_config(cfg)["total"]  # the model in fp32, and the weights read
    if need > machine_memory():
        raise UserError(f"{hf_dir}: reading this {count_parameters_from_config(cfg)['total'] / 1e9:,.1f}B-parameter model "
                        f"takes about {need / 2**30:,.0f} GiB, more than this machine's {machine_memory() / 2**30:,.0f} GiB")
    model = GPTModel(cfg)
    load_into(model, hf_to_ours(read_hf_state_dict(hf_dir), cfg), str(hf_dir))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Folders out


def tokenizer_files(folder: Path, context_length: int) -> None:
    """The model's tokenizer as transformers reads it: a trained or Hugging Face one's own files (its
    tokenizer.json, tokenizer_config.json, ...), or GPT-2's: the same two files our tokenizer is built
    from (vocab.json is encoder.json, merges.txt is vocab.bpe), its special token and its settings."""
    from gptkit.tokenizer import get_tokenizer

    tok = get_tokenizer()
    if "tokenizer.json" in tok.files:
        for name, text in tok.files.items():
            (folder / name).write_text(text, encoding="utf-8")
        doc = tok.eot_token
        (folder / "generation_config.json").write_text(json.dumps({
            "bos_token_id": doc, "eos_token_id": doc, "pad_token_id": doc, "do_sample": False}, indent=2))
        return
    bpe, enc = gpt2_bpe_files()
    shutil.copyfile(enc, folder / "vocab.json")
    shutil.copyfile(bpe, folder / "merges.txt")
    # GPT-2 has no padding token: end-of-text pads, as transformers' GPT-2 recipes do.
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
    _gpt2_tokenizer_json(enc, bpe, folder / "tokenizer.json")  # what AutoTokenizer loads fast
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "add_prefix_space": False,
        "add_bos_token": False, "errors": "replace", "clean_up_tokenization_spaces": False, **special,
        "added_tokens_decoder": {str(EOT_ID): {"content": EOT_TOKEN, "special": True, "lstrip": False, "rstrip": False,
                                               "normalized": True, "single_word": False}}}, indent=2))
    # GPT-2's tokenizer has no padding token: generation pads with end-of-text, as transformers does for GPT-2.
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID, "do_sample": False}, indent=2))


def _gpt2_tokenizer_json(encoder_json: Path, vocab_bpe: Path, out: Path) -> None:
    """GPT-2's BPE as a `tokenizers` file: byte-level, no prefix space, <|endoftext|> special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    tok.save(str(out))


def _card_facts(ckpt: dict):
    """From a checkpoint: its run record, the run's settings, the data it named, and last(key), the
    final recorded value of a history ("not recorded" when there is none)."""
    run = ckpt.get("run") or {}
    args = run.get("args") or {}
    history = (ckpt.get("progress") or {}).get("history") or {}
    data = (args.get("data") or args.get("data_dir") or "the embedded Project Gutenberg sample") if args else "unknown"

    def last(key: str) -> str:
        return f"{history[key][-1]:.4f}" if history.get(key) else "not recorded"
    return run, args, data, last


def _tokenizer_line() -> str:
    from gptkit.tokenizer import get_tokenizer

    tok = get_tokenizer()
    return "GPT-2's BPE tokenizer" if tok.name == "gpt2" else f"tokenizer {tok.name}, {tok.n_vocab:,} ids, in this folder"


def model_card(cfg: GPTConfig, ckpt: dict | None, source: str) -> str:
    """README.md of an export: what the model is, what it was trained on, how far, and how it was made."""
    ckpt = ckpt or {}
    run, args, data, last = _card_facts(ckpt)
    params = count_parameters_from_config(cfg)["total"]
    arch = ARCHITECTURES[hf_architecture(cfg)]
    core = last("core")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [{hf_architecture(cfg)}, causal-lm]
---

# A {params / 1e6:.1f}M-parameter GPT pretrained with this toolkit ({arch})

{cfg.n_layers} layers, {cfg.emb_dim} wide, {cfg.n_heads} heads ({cfg.kv_heads} key/value), context
{cfg.context_length}, vocabulary {cfg.vocab_size} ({_tokenizer_line()}); parts: {cfg.position} positions,
{cfg.norm}, {cfg.mlp} MLP{", QK-norm" if cfg.qk_norm else ""}, head {"tied" if cfg.tie_embeddings else "untied"}.
Trained from scratch.

| | |
| --- | --- |
| trained on | {data} |
| steps | {ckpt.get("step", 0):,} |
| tokens seen | {ckpt.get("tokens_seen", 0):,} |
| final train loss | {last("train_loss")} |
| final validation loss | {last("val_loss")} |
| final validation bits per byte | {last("val_bpb")} |
| final CORE | {core} |
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
        raise UserError(f"{out} already exists and is not an empty folder; pick a new output folder")


def export_hf(model: GPTModel, out_dir, ckpt: dict | None = None, source: str = "CHECKPOINT") -> Path:
    """A Hugging Face folder (config, weights, tokenizer, generation config, model card) of the
    architecture that represents the model, written to a temp folder and renamed into place, so a
    failure leaves nothing half-written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    _fresh_output(out)
    weights = ours_to_hf(model)  # refuses a model with no equivalent before anything is written
    cfg = unpadded_state_dict(model)[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp makes 0700: give the folder normal permissions
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
        tokenizer_files(tmp, hf_config(cfg).get("max_position_embeddings", cfg.context_length))
        (tmp / "README.md").write_text(model_card(cfg, ckpt, source))
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", file_mode())  # safetensors writes 0600
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = full_disk_cause(e)
        if full is not None:
            raise disk_full(out, full, sum(v.numel() * v.element_size() for v in weights.values())) from None
        raise
    return out
