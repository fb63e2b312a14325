"""The named sets of parts behind --arch. Each part can still be set alone on top of one (--arch gpt2
--position rotary), for ablations."""

from gptkit.parts import ArchSpec, register_arch

register_arch(ArchSpec("gpt2", "GPT-2 (2019): learned positions, LayerNorm, GELU MLP, tied head, biases"))
register_arch(ArchSpec(
    "llama", "Llama: rotary positions, RMSNorm with gains, SwiGLU, untied head, no biases (GQA with --n_kv_heads)",
    fields=dict(position="rotary", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False, qkv_bias=False)))
register_arch(ArchSpec(
    "modern", "nanochat's block: rotary, RMSNorm without gains (also after the embedding), QK-norm, ReLU^2 MLP, "
              "untied head, no biases, zero-initialised output projections",
    fields=dict(position="rotary", norm="rmsnorm", embed_norm=True, qk_norm=True, mlp="relu2", tie_embeddings=False,
                bias=False, qkv_bias=False, init="zero_proj"),
    parts={"rmsnorm": {"affine": False}}))
