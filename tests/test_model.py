import dataclasses
import math

import pytest
import torch

import gpt_train as gt
from gptkit import runtime
from gptkit.optim import decay_groups, trainable

GPT2_PARAMS = {  # tied parameter counts of OpenAI's GPT-2 checkpoints (biases included)
    "124M": 124_439_808,
    "355M": 354_823_168,
    "774M": 774_030_080,
    "1558M": 1_557_611_200,
}


@pytest.mark.parametrize("name,layers,dim,heads", [
    ("124M", 12, 768, 12), ("355M", 24, 1024, 16), ("774M", 36, 1280, 20), ("1558M", 48, 1600, 25)])
def test_gpt2_presets_shapes_and_counts(name, layers, dim, heads):
    cfg = gt.get_config(name)
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.context_length, cfg.vocab_size) == (layers, dim, heads, 1024, 50257)
    with torch.device("meta"):  # no memory is spent on weights
        model = gt.GPTModel(cfg)
        logits = model(torch.zeros(2, 7, dtype=torch.long))
    assert logits.shape == (2, 7, 50257)
    counts = gt.count_parameters(model)
    assert counts["tied"] == GPT2_PARAMS[name]
    assert counts["untied"] == GPT2_PARAMS[name] + 50257 * dim
    assert counts["non_embedding"] == GPT2_PARAMS[name] - 50257 * dim - 1024 * dim
    assert model.lm_head.weight is model.wte.weight


def test_untied_head_is_a_separate_matrix():
    cfg = gt.get_config("debug", tie_embeddings=False)
    model = gt.GPTModel(cfg)
    assert model.lm_head.weight is not model.wte.weight
    counts = gt.count_parameters(model)
    assert counts["untied"] == sum(p.numel() for p in model.parameters())


def test_aliases_and_bad_configs():
    assert gt.get_config("gpt2-medium").n_layers == 24
    with pytest.raises(gt.UserError, match="unknown model preset"):
        gt.get_config("huge")
    with pytest.raises(gt.UserError, match="not divisible"):
        gt.get_config("debug", emb_dim=30, n_heads=4)


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    cfg = gt.get_config("debug", emb_dim=256, n_heads=4, n_layers=8)
    model = gt.GPTModel(cfg)
    std = model.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002


def test_too_long_input_is_refused(tiny_cfg):
    model = gt.GPTModel(tiny_cfg)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, tiny_cfg.context_length + 1, dtype=torch.long))


def test_sdpa_and_explicit_attention_agree(tiny_cfg):
    torch.manual_seed(0)
    model = gt.GPTModel(tiny_cfg).eval()
    plain = gt.GPTModel(dataclasses.replace(tiny_cfg, flash=False)).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, tiny_cfg.vocab_size, (3, tiny_cfg.context_length))
    torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)
    # and gradients
    loss_a = gt.calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu")
    ga = torch.autograd.grad(loss_a, model.h[0].attn.c_attn.weight)[0]
    loss_b = gt.calc_loss_batch(x[:, :-1], x[:, 1:], plain, "cpu")
    gb = torch.autograd.grad(loss_b, plain.h[0].attn.c_attn.weight)[0]
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_attention_is_causal(tiny_cfg):
    torch.manual_seed(0)
    model = gt.GPTModel(tiny_cfg).eval()
    x = torch.randint(0, tiny_cfg.vocab_size, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % tiny_cfg.vocab_size  # change only the future
    torch.testing.assert_close(model(x)[0, :7], model(y)[0, :7])


def test_generation_follows_the_models_own_predictions(tiny_cfg):
    torch.manual_seed(123)
    model = gt.GPTModel(tiny_cfg).eval()
    tok = gt.get_tokenizer()
    idx = gt.text_to_token_ids("Every effort moves you", tok)
    out = gt.generate(model, idx, max_new_tokens=6)
    assert out[0, :4].tolist() == [6109, 3626, 6100, 345]
    with torch.no_grad():
        for t in range(4, 10):  # greedy: each new token is the argmax given everything before it
            assert out[0, t].item() == model(out[:, :t])[0, -1].argmax().item()

    def sample(seed):
        return gt.generate(model, idx, max_new_tokens=6, temperature=1.0, top_k=50,
                           generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(7), sample(7), sample(8)
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded: reproducible, and the seed matters
    with torch.no_grad():
        for t in range(4, 10):  # every sampled token is among the 50 most likely
            assert a[0, t].item() in torch.topk(model(a[:, :t])[0, -1], 50).indices.tolist()


def test_generate_top_k_and_eos(tiny_cfg):
    torch.manual_seed(0)
    model = gt.GPTModel(tiny_cfg).eval()
    idx = torch.tensor([[1, 2, 3]])
    # With top_k=1, sampling at any temperature is greedy decoding.
    greedy = gt.generate(model, idx, 5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(gt.generate(model, idx, 5, temperature=5.0, top_k=1, generator=g), greedy)
    # Generation stops (without appending it) when the end-of-text id comes up.
    eos_first = gt.generate(model, idx, 5, eos_id=int(greedy[0, 3]))
    assert eos_first.shape[1] == 3
    # Long prompts are cropped to the context.
    long = torch.randint(0, 100, (1, tiny_cfg.context_length + 5))
    assert gt.generate(model, long, 2).shape[1] == tiny_cfg.context_length + 7


def test_tiny_model_overfits_a_short_text(tiny_cfg):
    torch.manual_seed(0)
    tok = gt.get_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    loader = gt.create_dataloader(text, batch_size=4, context_length=tiny_cfg.context_length, tokenizer=tok)
    model = gt.GPTModel(tiny_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = _mean_loss(loader, model)
    for _ in range(20):
        for x, y in loader:
            loss = gt.calc_loss_batch(x, y, model, "cpu")
            opt.zero_grad()
            loss.backward()
            opt.step()
    end = _mean_loss(loader, model)
    assert start > 10.0
    assert end < 1.0


def _mean_loss(loader, model) -> float:
    total, count = gt.loss_sums(loader, model, "cpu")
    return total / count


def test_empty_loader_is_an_error(tiny_cfg):
    loader = gt.create_dataloader("too short", batch_size=2, context_length=tiny_cfg.context_length)
    assert len(loader) == 0
    with pytest.raises(gt.UserError, match="empty data loader"):
        _mean_loss(loader, gt.GPTModel(tiny_cfg))


def test_weight_decay_groups(tiny_cfg):
    model = gt.GPTModel(tiny_cfg)
    decay, no_decay = decay_groups(trainable(model), 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # the tied matrix counted once
    assert any(p is model.wte.weight for p in decay["params"])
    assert any(p is model.ln_f.weight for p in no_decay["params"])


def test_plot_losses_writes_png(tmp_path):
    path = gt.plot_losses([1, 2, 3], [10, 20, 30], [3.0, 2.0, 1.5], [3.1, 2.5], tmp_path / "p.png", val_steps=[1, 3])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arch_fields_are_every_field_but_the_runtime_ones():
    import dataclasses

    names = [f.name for f in dataclasses.fields(gt.GPTConfig)]
    assert set(gt.ARCH_FIELDS) == set(names) - {"drop_rate", "flash", "activation_checkpointing"}
    assert "vocab_multiple" in gt.ARCH_FIELDS  # it changes tensor shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_cross_entropy_equals_the_plain_one(dtype):
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = (3 * torch.randn(64, 50257)).to(dtype)
    targets = torch.randint(0, 50257, (64,))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    lean = gt._MeanCrossEntropy.apply(a, targets)
    (2.5 * lean).backward()
    plain = F.cross_entropy(b.float(), targets)
    (2.5 * plain).backward()
    assert lean.item() == pytest.approx(plain.item(), rel=1e-6)
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-9)


def test_compiled_cross_entropy_equals_the_plain_one():
    """The fused loss that compiled GPU runs use, compiled here for the CPU: same value, same gradient,
    on a strided (vocabulary-padded, sliced) bf16 input as the model returns it."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    padded = (3 * torch.randn(2, 16, 576)).to(torch.bfloat16)
    targets = torch.randint(0, 500, (32,))
    a = padded.clone().requires_grad_()
    b = padded.clone().requires_grad_()
    fused = gt.compiled_cross_entropy()(a[..., :500].flatten(0, 1), targets)
    plain = F.cross_entropy(b[..., :500].flatten(0, 1).float(), targets)
    (3 * fused).backward()
    (3 * plain).backward()
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1.6e-2, atol=1e-6)
    assert not a.grad[..., 500:].any()  # padded columns get no gradient


def test_plain_cuda_means_this_processs_gpu(monkeypatch):
    """'--device cuda' carries no index, which torch.cuda.set_device refuses: it means the GPU of this
    process (LOCAL_RANK under torchrun)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gt.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert gt.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(gt.UserError, match="2 GPU"):
        gt.resolve_device("cuda:2")
    assert gt.resolve_device("cpu", local_rank=1) == torch.device("cpu")


def test_dtype_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_feature", lambda: "AVX512-BF16")
    assert gt.auto_dtype(cpu) == ("bf16", "auto: the CPU has AVX512-BF16")
    rt = gt.setup_runtime("cpu", "auto")
    assert rt.dtype == "bf16" and "AVX512-BF16" in rt.dtype_reason
    monkeypatch.setattr(runtime, "cpu_bf16_feature", lambda: None)
    dtype, why = gt.auto_dtype(cpu)
    assert dtype == "fp32" and "no native bf16" in why
    assert gt.setup_runtime("cpu", "fp32").dtype == "fp32"  # always available
