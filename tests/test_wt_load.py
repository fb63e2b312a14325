import json

import pytest
import torch
from conftest import run_cli, run_script

import gpt_train as gt
import pretraining_simple
import wt_load

transformers = pytest.importorskip("transformers")


def hf_model(tmp_path, zero_qkv_bias=False, tied=True, fmt="safetensors"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=50257,
                                  tie_word_embeddings=tied)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # GPT-2 initialises biases and LayerNorms to constants: make them all random
            p.add_(torch.randn_like(p) * 0.02)
        if zero_qkv_bias:
            for block in m.transformer.h:
                block.attn.c_attn.bias.zero_()
    d = tmp_path / f"hf_{fmt}_{zero_qkv_bias}_{tied}"
    m.save_pretrained(d)
    if fmt == "bin":  # the legacy format: a pickled state dict
        torch.save(m.state_dict(), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
    return m, d


IDS = torch.tensor([[15496, 11, 995, 13, 1649, 257, 640, 612, 373, 257, 1110, 286, 262, 1913, 290, 6958]])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("zero_qkv_bias", [False, True])
def test_hf_weights_load_with_identical_logits(tmp_path, fmt, zero_qkv_bias):
    ref, d = hf_model(tmp_path, zero_qkv_bias, fmt=fmt)
    ours = wt_load.load_hf(str(d))
    assert ours.cfg.n_layers == 2 and ours.cfg.emb_dim == 64 and ours.cfg.context_length == 32
    assert ours.lm_head.weight is ours.wte.weight
    with torch.no_grad():
        diff = (ours(IDS) - ref(IDS).logits).abs().max().item()
    assert diff <= 1e-5


def test_untied_hf_head_loads(tmp_path):
    ref, d = hf_model(tmp_path, tied=False)
    ours = wt_load.load_hf(str(d))
    assert not ours.cfg.tie_embeddings
    with torch.no_grad():
        assert (ours(IDS) - ref(IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_export_loads_in_transformers_with_identical_logits(tmp_path, qkv_bias):
    torch.manual_seed(1)
    ours = gt.GPTModel(gt.get_config("debug", emb_dim=64, n_heads=4, qkv_bias=qkv_bias)).eval()
    out = wt_load.export_hf(ours, tmp_path / "hf")
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    ref = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert (ours(IDS[:, :16]) - ref(IDS[:, :16]).logits).abs().max().item() <= 1e-5


def test_greedy_generation_matches_transformers(tmp_path):
    ref, d = hf_model(tmp_path)
    ours = wt_load.load_hf(str(d))
    prompt = IDS[:, :5]
    mine = gt.generate(ours, prompt, max_new_tokens=12)
    theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt),
                          pad_token_id=50256, eos_token_id=None)
    assert mine.tolist() == theirs.tolist()


def test_training_checkpoint_exports_and_reloads(small_corpus, tmp_path):
    res = pretraining_simple.main(["--data_dir", str(small_corpus), "--output_dir", str(tmp_path / "run"), "--debug",
                                   "--max_steps", "3", "--no-progress"])
    ckpt = res["checkpoint"]
    model, _ = wt_load.load_ours(ckpt)
    hf_dir = wt_load.export_hf(model, tmp_path / "hf")
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x = IDS[:, :10]
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-5
    # round trip: HF folder -> our checkpoint -> same weights
    back = wt_load.load_hf(str(hf_dir))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    # weights-only export: smaller, no optimizer, same logits
    st = wt_load.export_safetensors(model, tmp_path / "w.safetensors", gt.load_checkpoint(ckpt))
    assert st.stat().st_size < ckpt.stat().st_size / 2
    again, meta = wt_load.load_ours(st)
    assert meta["step"] == 3
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_cli_round_trip_and_inspect(tmp_path):
    _, d = hf_model(tmp_path)
    r = run_script(["wt_load.py", "from-hf", d, tmp_path / "ours.pt"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_script(["wt_load.py", "inspect", tmp_path / "ours.pt", "--json"], cwd=tmp_path)
    info = json.loads(r.stdout)
    assert info["config"]["n_layers"] == 2 and info["step"] == 0 and info["optimizer_state"] == "none"
    assert info["parameters"] == sum(p.numel() for p in wt_load.load_hf(str(d)).parameters())
    r = run_script(["wt_load.py", "to-hf", tmp_path / "ours.pt", tmp_path / "back"], cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "back" / "model.safetensors").exists()
    r = run_script(["wt_load.py", "generate", tmp_path / "ours.pt", "--max_new_tokens", "3"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("Every effort moves you")
    for cmd in ("inspect", "from-hf", "to-hf", "to-safetensors", "from-openai", "generate"):
        with pytest.raises(SystemExit) as e:
            wt_load.build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0


def test_init_from_pretrained_weights(tmp_path, small_corpus):
    _, d = hf_model(tmp_path)
    ours = wt_load.load_hf(str(d))
    model = gt.GPTModel(gt.get_config("debug", emb_dim=64, n_heads=4))
    wt_load.init_weights(model, str(d))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(gt.CheckpointError, match=r"--init_from .* different model config: emb_dim=64 \(model: 32\)"):
        wt_load.init_weights(gt.GPTModel(gt.get_config("debug")), str(d))


def test_bad_inputs(tmp_path, capsys, monkeypatch):
    # An empty Hugging Face cache: a gpt2 already cached on this machine must not turn the hub error into a success.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))

    def err(args):
        code, _, stderr = run_cli(wt_load.main, args, capsys)
        assert code == 2 and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
        return stderr

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert "config.json lacks vocab_size" in err(["from-hf", tmp_path / "empty", tmp_path / "o.pt"])
    _, d = hf_model(tmp_path)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((d / "config.json").read_text())
    assert "has no weights" in err(["from-hf", tmp_path / "noweights", tmp_path / "o.pt"])
    assert "gpt5: no such file or folder, and not a GPT-2 size" in err(["from-hf", "gpt5", tmp_path / "o.pt"])
    assert "getting it from the Hugging Face hub failed" in err(["from-hf", "gpt2", tmp_path / "o.pt"])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((d / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "corrupt" in err(["from-hf", corrupt, tmp_path / "o.pt"])
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "n_embd": 128}))
    (wrong / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    assert "tensor 'wte.weight' has shape (50257, 64), the model expects (50257, 128)" in err(
        ["from-hf", wrong, tmp_path / "o.pt"])
    assert "corrupt or truncated" in err(["to-hf", d / "config.json", tmp_path / "x"])
    assert "no gpt_config metadata" in err(["inspect", d / "model.safetensors"])
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / "hparams.json").write_text("{}")
    assert "tensorflow" in err(["from-openai", tmp_path / "openai", tmp_path / "o.pt"])
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "x").exists()
    assert run_cli(wt_load.main, ["from-hf", d, tmp_path / "ours.pt"], capsys)[0] == 0
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert "already exists" in err(["to-hf", tmp_path / "ours.pt", tmp_path / "taken"])
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_advanced_script_init_from_hf_dir(tmp_path, small_corpus):
    import pretraining_advanced as adv

    _, d = hf_model(tmp_path)
    res = adv.main(["--data", str(small_corpus), "--cache_dir", str(tmp_path / "cache"), "--val_fraction", "0.2",
                    "--model", "debug", "--emb_dim", "64", "--n_heads", "4", "--batch_size", "2", "--max_steps", "1",
                    "--lr", "1e-30", "--min_lr", "1e-31", "--no-progress", "--run_dir", str(tmp_path / "run"), "--init_from",
                    str(d)])
    trained = gt.load_checkpoint(res["checkpoint"])["model"]
    ref = wt_load.load_hf(str(d)).state_dict()
    assert all(torch.allclose(trained[k], ref[k], rtol=0, atol=1e-20) for k in ref)  # lr 1e-30: they did not move


def test_simple_script_init_from_our_checkpoint(tmp_path, small_corpus):
    torch.manual_seed(3)
    model = gt.GPTModel(gt.get_config("debug"))
    ckpt = wt_load.save_from_model(model, tmp_path / "init.pt", "test")
    res = pretraining_simple.main(["--data_dir", str(small_corpus), "--output_dir", str(tmp_path / "run"), "--debug",
                                   "--max_steps", "1", "--lr", "1e-30", "--weight_decay", "0", "--no-progress",
                                   "--init_from", str(ckpt)])
    trained = gt.load_checkpoint(res["checkpoint"])["model"]
    assert all(torch.allclose(trained[k], v, rtol=0, atol=1e-20) for k, v in model.state_dict().items())


PASSAGE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
           "want of a wife.\n\n“However little known the feelings or views of such a man may be…” — naïve café, 1813.")


def test_hf_export_is_a_complete_model_for_transformers(tmp_path, small_corpus, capfd):
    res = pretraining_simple.main(["--data_dir", str(small_corpus), "--output_dir", str(tmp_path / "run"), "--debug",
                                   "--max_steps", "3", "--no-progress"])
    model, ckpt = wt_load.load_ours(res["checkpoint"])
    out = wt_load.export_hf(model, tmp_path / "hf", ckpt, str(res["checkpoint"]))
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = gt.get_tokenizer()
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok(PASSAGE)["input_ids"] == ours.encode(PASSAGE)
    assert tok.decode(ours.encode(PASSAGE)) == PASSAGE
    pipe = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    generated = pipe("Every effort moves you", max_new_tokens=8, do_sample=False,
                     return_tensors=True)[0]["generated_token_ids"]
    prompt = gt.text_to_token_ids("Every effort moves you", ours)
    mine = gt.generate(model, prompt, max_new_tokens=8)[0].tolist()
    assert list(generated) == mine and len(mine) == prompt.shape[1] + 8  # the prompt, then the same 8 new tokens
    card = (out / "README.md").read_text()
    assert "| steps | 3 |" in card and "final train loss" in card and '"n_layers": 2' in card
    assert "| optimizer | adamw |" in card and "ckpt_00000003.pt OUT_DIR" in card
    assert str(tmp_path) not in card.split("## Training settings")[0]  # the checkpoint by name, not its local path
    assert "max_length" not in json.loads((out / "generation_config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    capfd.readouterr()
    hf.generate(prompt, max_new_tokens=2, do_sample=False)  # transformers warns (on stderr) if max_length is set too
    assert "max_length" not in capfd.readouterr().err


def test_safetensors_export_loads_strictly(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(2)
    model = gt.GPTModel(gt.get_config("debug"))
    path = wt_load.export_safetensors(model, tmp_path / "w.safetensors")
    fresh = gt.GPTModel(gt.get_config("debug"))
    fresh.load_state_dict(load_file(str(path)))  # strict: every tensor, the tied head included
    assert fresh.lm_head.weight is fresh.wte.weight
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_padded_vocabulary_exports_and_reloads_unpadded(tmp_path):
    torch.manual_seed(3)
    padded = gt.GPTModel(gt.get_config("debug", vocab_multiple=64)).eval()
    assert padded.wte.weight.shape[0] == 50304 and padded.cfg.padded_vocab_size == 50304
    x = IDS[:, :12]
    with torch.no_grad():
        logits = padded(x)
    assert logits.shape[-1] == 50257  # padded rows are never logits, so never sampled nor in the loss
    ckpt = wt_load.save_from_model(padded, tmp_path / "p.pt", "test")
    again, _ = wt_load.load_ours(ckpt)
    assert again.cfg.vocab_multiple == 64
    hf = wt_load.export_hf(padded, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 50257
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
    st = wt_load.export_safetensors(padded, tmp_path / "w.safetensors")
    plain, meta = wt_load.load_ours(st)
    assert meta["config"]["vocab_multiple"] == 1 and plain.wte.weight.shape[0] == 50257
    with torch.no_grad():
        assert (ref(x).logits - logits).abs().max().item() <= 1e-5
        assert torch.equal(plain(x), logits)
    # and back: plain GPT-2 weights into a padded model (--init_from gpt2 with --pad_vocab)
    target = gt.GPTModel(gt.get_config("debug", vocab_multiple=64)).eval()
    wt_load.init_weights(target, str(hf))
    with torch.no_grad():
        assert (target(x) - logits).abs().max().item() <= 1e-5


def test_generate_from_an_empty_prompt_starts_at_end_of_text(tmp_path, capsys):
    from conftest import run_cli

    torch.manual_seed(4)
    path = wt_load.save_from_model(gt.GPTModel(gt.get_config("debug")), tmp_path / "m.pt", "test")
    code, out, err = run_cli(wt_load.main, ["generate", path, "--prompt", "", "--max_new_tokens", "3"], capsys)
    assert code == 0 and err == "" and out.strip()  # as GPT-2 samples unconditionally: after <|endoftext|>
    assert gt.text_to_token_ids("", gt.get_tokenizer()).tolist() == [[gt.EOT_ID]]


# ----------------------------------------------------------------------------------------------
# The modern block's parts, exported as the Hugging Face architecture that computes the same function


def parts_model(arch: str, **over) -> gt.GPTModel:
    """A 2-block model of the arch's parts with random weights everywhere (norm gains included), GQA."""
    base = {"llama": dict(position="rotary", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False,
                          qkv_bias=False, n_kv_heads=2, parts={"rotary": {"base": 500000.0},
                                                               "rmsnorm": {"affine": True, "eps": 1e-5},
                                                               "swiglu": {"hidden": 96}})}
    base["qwen3"] = {**base["llama"], "qk_norm": True}
    torch.manual_seed(3)
    model = gt.GPTModel(gt.get_config("debug", emb_dim=64, n_heads=4, **{**base[arch], **over})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_llama_and_qwen3_parts_export_read_back_and_generate_as_transformers(arch, cls, tmp_path, capsys):
    ours = parts_model(arch)
    out = wt_load.export_hf(ours, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [cls] and cfg["num_key_value_heads"] == 2 and cfg["intermediate_size"] == 96
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert type(ref).__name__ == cls
    with torch.no_grad():
        assert (ours(IDS) - ref(IDS).logits).abs().max().item() <= 1e-5
    prompt = IDS[:, :5]
    mine = gt.generate(ours, prompt, max_new_tokens=12)
    theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt),
                          pad_token_id=50256, eos_token_id=None)
    assert mine.tolist() == theirs.tolist()
    back = wt_load.load_hf(str(out))  # from-hf: the same parts, the same logits
    # Rotary positions have no table: the export says 8192 positions (no warning past the training context)
    assert back.cfg.to_dict() == {**ours.cfg.to_dict(), "drop_rate": 0.0, "init": "gpt2", "context_length": 8192}
    with torch.no_grad():
        assert (back(IDS) - ours(IDS)).abs().max().item() <= 1e-6
    code, _, _ = run_cli(wt_load.main, ["from-hf", out, tmp_path / "back.pt"], capsys)
    assert code == 0 and gt.load_checkpoint(tmp_path / "back.pt")["config"]["position"] == "rotary"


def test_an_rmsnorm_without_gains_exports_as_gains_of_one(tmp_path):
    ours = parts_model("llama", parts={"rmsnorm": {"affine": False, "eps": 1e-6}})
    ref = transformers.AutoModelForCausalLM.from_pretrained(wt_load.export_hf(ours, tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (ours(IDS) - ref(IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("over,part", [
    (dict(position="rotary", norm="rmsnorm", mlp="relu2", qk_norm=True, embed_norm=True), "--embed_norm"),  # modern
    (dict(position="rotary", norm="rmsnorm", mlp="relu2"), "--mlp relu2"),
    (dict(position="rotary"), "--norm layernorm with rotary positions"),
    (dict(mlp="swiglu"), "--mlp swiglu with learned positions"),
    (dict(n_kv_heads=1), "--n_kv_heads with learned positions"),
])
def test_parts_with_no_hugging_face_equivalent_are_named(over, part, tmp_path):
    model = gt.GPTModel(gt.get_config("debug", **over))
    with pytest.raises(gt.UserError, match=f"this model's {part}.* has no Hugging Face equivalent"):
        wt_load.export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_init_from_a_llama_folder_continues_pretraining(tmp_path, small_corpus):
    out = wt_load.export_hf(parts_model("llama", context_length=32), tmp_path / "hf")
    flags = ["--data_dir", str(small_corpus), "--model", "debug", "--emb_dim", "64", "--n_heads", "4", "--arch", "llama",
             "--n_kv_heads", "2", "--rotary_base", "500000", "--rmsnorm_eps", "1e-5", "--swiglu_hidden", "96",
             "--max_steps", "2", "--no-progress", "--eval_every", "0", "--sample_every", "0"]
    res = pretraining_simple.main([*flags, "--init_from", str(out), "--run_dir", str(tmp_path / "r")])
    assert res["state"].step == 2
    with pytest.raises(gt.UserError, match=r"--n_kv_heads disagrees with --init_from .*n_kv_heads=2 \(this flag makes it 1\)"):
        one_kv = [("1" if flags[i - 1] == "--n_kv_heads" else f) for i, f in enumerate(flags)]
        pretraining_simple.main([*one_kv, "--init_from", str(out), "--run_dir", str(tmp_path / "r2")])


def test_generation_with_the_cache_equals_without_for_every_arch_and_batch():
    from gptkit.generation import generate_batch

    prompts = [IDS[0, :5].tolist(), IDS[0, :2].tolist(), IDS[0, :9].tolist()]
    for arch in ({}, dict(position="rotary", norm="rmsnorm", mlp="swiglu", n_kv_heads=1, tie_embeddings=False),
                 dict(position="rotary", norm="rmsnorm", embed_norm=True, qk_norm=True, mlp="relu2",
                      parts={"rmsnorm": {"affine": False, "eps": 1e-6}})):
        torch.manual_seed(0)
        model = gt.GPTModel(gt.get_config("debug", **arch)).eval()  # context 32: the run goes past it
        for p in prompts:
            x = torch.tensor([p])
            assert torch.equal(gt.generate(model, x, 40), gt.generate(model, x, 40, use_cache=False))
        alone = [gt.generate(model, torch.tensor([p]), 20, use_cache=False)[0, len(p):].tolist() for p in prompts]
        assert generate_batch(model, prompts, 20) == alone  # left-padded in one batch: each row as alone


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(gt.next_token(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}
    assert {int(gt.next_token(logits, 1.0, top_p=0.81, generator=torch.Generator().manual_seed(s)))
            for s in range(200)} == {0, 1, 2}
