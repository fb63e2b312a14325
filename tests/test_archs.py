"""The modern block's parts on every path a GPT-2 takes: the planner's byte counts, Muon's groups,
exact resume, FSDP with activation checkpointing, compile; nanochat's size dial and Chinchilla's
budget; bits per byte."""

import math

import pytest
import torch
from conftest import fsdp_against_one_process

import gpt_train as gt
import pretraining_simple as simple
from gptkit.args import depth_sizes
from gptkit.optim import OptimArgs, build_optimizer, measured_state_bytes, optimizer_spec

ARCHS = {"gpt2": [], "llama": ["--arch", "llama", "--n_kv_heads", "1"], "modern": ["--arch", "modern"]}
DEBUG = ["--model", "debug", "--batch_size", "4", "--no-progress", "--dtype", "fp32", "--device", "cpu", "--eval_every",
         "0", "--sample_every", "0", "--seed", "3", "--lr", "2e-3", "--warmup_steps", "1"]


def config_of(arch: str, model: str = "debug") -> gt.GPTConfig:
    return simple.parse_args(["--model", model, *ARCHS[arch]]).shared.model_config


@pytest.mark.parametrize("arch,preset", [("gpt2", "debug"), ("gpt2", "small"), ("llama", "debug"), ("modern", "debug")])
@pytest.mark.parametrize("optimizer", ["adamw", "muon", "galore"])
def test_planner_bytes_equal_the_tensors_for_every_arch(arch, preset, optimizer):
    cfg = config_of(arch, preset)
    spec = optimizer_spec(optimizer)
    config = spec.config(rank=16, update_proj_gap=10) if optimizer == "galore" else spec.config() if spec.config else None
    torch.manual_seed(0)
    model = gt.GPTModel(cfg)
    opt = build_optimizer(model, OptimArgs(optimizer=optimizer, lr=1e-3), config, torch.device("cpu"))
    x = torch.randint(0, 50257, (1, 9))
    gt.calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu").backward()
    opt.step()
    unique = {id(p): p for p in model.parameters()}.values()
    plan = gt.memory_plan(cfg, gt.TrainSetup(batch_size=1, optimizer=optimizer, optimizer_config=config, cuda=False))
    assert plan["parameters"] == sum(p.numel() * p.element_size() for p in unique)
    assert plan["optimizer"] == measured_state_bytes(opt, spec)
    counts = gt.count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in unique)
    assert plan["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in unique)
    attention = cfg.n_layers * 12 * cfg.emb_dim * 32
    assert gt.flops_per_token(cfg, 32) == 6 * (counts["non_embedding"] + 50257 * cfg.emb_dim) + attention


def test_muon_takes_the_block_matrices_and_the_head_and_embedding_their_own_lrs():
    cfg = config_of("modern")
    model = gt.GPTModel(cfg)
    from gptkit.optim.muon import MuonConfig

    opt = build_optimizer(model, OptimArgs(optimizer="muon", lr=1e-3), MuonConfig(lr=0.02, embed_lr=0.05, head_lr=0.004),
                          torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("h.") and p.dim() == 2}
    groups = {tuple(names[id(p)] for p in g["params"]): g for g in opt.optimizers["adamw"].param_groups}
    assert groups[("wte.weight",)]["lr_scale"] == pytest.approx(50) and groups[("lm_head.weight",)]["lr_scale"] == 4
    assert not any("q_norm" in n or "ln_" in n for n in muon)  # modern's norms have no weights; QK-norm's neither
    from gptkit.runtime import native_bf16

    auto = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
    assert opt.optimizers["muon"].ns_dtype == auto  # emulated bf16 would be 20x slower than fp32
    for chosen, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        built = build_optimizer(model, OptimArgs(optimizer="muon", lr=1e-3), MuonConfig(ns_dtype=chosen), torch.device("cpu"))
        assert built.optimizers["muon"].ns_dtype == dtype



@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_written_out_is_torchs_step_and_fp32_iterations_stay_close(adjust, nesterov):
    """The fp32 path (CPUs without native bf16) is torch.optim.Muon's step: bit-identical when run in
    bf16, and within bf16's rounding of it in fp32; state dicts are torch's."""
    from gptkit.optim.muon import Muon

    torch.manual_seed(0)
    shapes = [(48, 16), (16, 40), (24, 24)]
    start = [torch.randn(s) for s in shapes]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    runs = {"torch": None, "bf16": torch.bfloat16, "fp32": torch.float32}
    params = {name: [torch.nn.Parameter(t.clone()) for t in start] for name in runs}
    opts = {name: torch.optim.Muon(params[name], **kw) if dt is None else Muon(params[name], dt, **kw)
            for name, dt in runs.items()}
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for name, opt in opts.items():
            for p, g in zip(params[name], grads):
                p.grad = g.clone()
            opt.step_in(torch.bfloat16) if name == "bf16" else opt.step()
    for t, b, f in zip(*params.values()):
        assert torch.equal(t, b) and not torch.equal(t, f)
        assert (t - f).abs().max() < 2e-3
    assert opts["fp32"].state_dict()["state"][0].keys() == opts["torch"].state_dict()["state"][0].keys()

@pytest.mark.parametrize("arch", ["llama", "modern"])
def test_new_archs_train_with_muon_and_resume_bit_identically(arch, small_corpus, tmp_path):
    flags = ["--data_dir", str(small_corpus), *DEBUG, *ARCHS[arch], "--optimizer", "muon", "--muon_head_lr", "0.004",
             "--max_steps", "6", "--save_every", "3", "--keep_last", "0", "--drop_rate", "0.1"]
    full = simple.main([*flags, "--run_dir", str(tmp_path / "full")])
    resumed = simple.main([*flags, "--run_dir", str(tmp_path / "part"), "--resume", str(tmp_path / "full" /
                                                                                          "ckpt_00000003.pt")])
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    assert full["history"]["train_loss"][-1] < full["history"]["train_loss"][0]
    import wt_load

    info = wt_load.describe_checkpoint(full["checkpoint"])
    assert info["config"]["position"] == "rotary" and info["optimizer"] == "Muon+AdamW"
    with pytest.raises(gt.CheckpointError, match="different model config"):  # another arch cannot resume it
        simple.main([*flags[: flags.index("--arch")], *DEBUG, "--optimizer", "muon", "--muon_head_lr", "0.004",
                     "--max_steps", "8", "--run_dir", str(tmp_path / "full"), "--resume", "auto"])


def test_modern_under_fsdp_with_activation_checkpointing_matches_one_process(small_corpus, tmp_path):
    flags = ["--data", str(small_corpus), "--cache_dir", str(tmp_path / "cache"), "--val_fraction", "0.2", *DEBUG,
             "--arch", "modern", "--n_kv_heads", "1", "--max_steps", "3", "--save_every", "0",
             "--activation_checkpointing"]
    one, two = fsdp_against_one_process(flags, tmp_path)
    assert two["train_loss"] == pytest.approx(one["history"]["train_loss"], abs=1e-5)


def test_compile_gives_the_eager_losses_for_the_modern_block(small_corpus, tmp_path):
    flags = ["--data_dir", str(small_corpus), *DEBUG, "--arch", "modern", "--max_steps", "2"]
    eager = simple.main([*flags, "--run_dir", str(tmp_path / "e")])
    compiled = simple.main([*flags, "--run_dir", str(tmp_path / "c"), "--compile"])
    # Inductor fuses and reorders float ops: the same losses to float32 rounding, not bit for bit.
    assert compiled["history"]["train_loss"] == pytest.approx(eager["history"]["train_loss"], rel=1e-5)
    ckpt = gt.load_checkpoint(compiled["checkpoint"])
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    flags[flags.index("fp32")] = "bf16"  # and under bf16 autocast: RMSNorm, rotary, QK-norm in mixed precision
    bf16 = simple.main([*flags, "--run_dir", str(tmp_path / "b")])
    assert bf16["history"]["train_loss"][0] == pytest.approx(eager["history"]["train_loss"][0], abs=0.05)


def test_depth_is_one_dial_and_tokens_per_param_sets_the_steps(small_corpus, tmp_path):
    assert depth_sizes(4) == {"n_layers": 4, "emb_dim": 256, "n_heads": 2}  # heads of 128
    assert depth_sizes(20) == {"n_layers": 20, "emb_dim": 1280, "n_heads": 10}  # nanochat's d20
    assert depth_sizes(3) == {"n_layers": 3, "emb_dim": 192, "n_heads": 3}  # odd: heads of 64
    cfg = simple.parse_args(["--depth", "2", "--model", "debug"]).shared.model_config
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.context_length) == (2, 128, 1, 32)
    assert simple.parse_args(["--depth", "2", "--model", "debug"]).shared.model.label == "depth 2"  # the log's "model:"
    assert simple.parse_args(["--model", "debug"]).shared.model.label == "debug"
    with pytest.raises(gt.UserError, match="--depth and --n_layers cannot be used together"):
        simple.parse_args(["--depth", "2", "--n_layers", "3"])
    assert simple.parse_args(["--tokens_per_param"]).shared.batch.tokens_per_param == 20  # Chinchilla's, given alone
    with pytest.raises(gt.UserError, match="--tokens_per_param"):
        simple.parse_args(["--tokens_per_param", "--max_steps", "5"])
    res = simple.main(["--data_dir", str(small_corpus), *DEBUG, "--tokens_per_param", "0.0005", "--run_dir",
                       str(tmp_path / "r")])
    params = gt.count_parameters_from_config(gt.get_config("debug"))["total"]
    assert res["state"].step == math.ceil(0.0005 * params / (4 * 32))


def test_validation_bits_per_byte_equal_a_rolling_loglikelihood(tmp_path):
    """lm-evaluation-harness's bits_per_byte of one document (its rolling log-likelihood, the first token
    predicted from <|endoftext|>) equals the validation bpb over the same tokens: the summed loss over
    the text's tokens / (ln 2 x its UTF-8 bytes); <|endoftext|> stands for no text and does not count."""
    transformers = pytest.importorskip("transformers")
    import wt_load

    doc = "Alice was beginning to get very tired of sitting by her sister on the bank. “Oh dear!” — naïve café."
    tok = gt.get_tokenizer()
    ids = tok.encode_ordinary(doc)
    torch.manual_seed(0)
    model = gt.GPTModel(gt.get_config("debug", context_length=64)).eval()
    stream = torch.tensor([50256, *ids, 50256])  # a cache's stream: the document, then <|endoftext|>
    val = gt.TokenWindowDataset(stream.numpy(), len(ids) + 1)
    loader = gt.create_dataloader(val, 1, shuffle=False, drop_last=False)
    _, loss, bpb = gt.evaluate_model(model, None, loader, "cpu", 1, with_bpb=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(wt_load.export_hf(model, tmp_path / "hf")).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([[50256, *ids[:-1]]])).logits[0].float(), dim=-1)
    ll = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
    assert bpb == pytest.approx(-ll / (math.log(2) * len(doc.encode("utf-8"))), rel=1e-5)
    assert loss == pytest.approx((-ll + -float(torch.log_softmax(model(stream[None, :-1])[0, -1], -1)[50256]))
                                 / (len(ids) + 1), rel=1e-5)
