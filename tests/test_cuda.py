"""The CUDA-only paths, on a machine with an NVIDIA GPU (benchmarks/gpu_check.sh runs this file there):
pinned prefetch, bf16 autocast with torch.compile and the fused loss, fp16 loss scaling, fused AdamW,
the padded vocabulary by default, pretraining_advanced.py's checkpoint and resume, and FSDP2's bf16
mixed-precision policy under torchrun (NCCL). They are skipped where CUDA is not available; the last
test runs the GPU benchmark's stages on the CPU, so the script is known to work before GPU time is
spent on it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import gpt_train as gt
import pretraining_advanced as adv

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

CUDA = torch.device("cuda")


def _dataset(context: int = 64) -> gt.TokenWindowDataset:
    """A short random phrase repeated: learnable in a few steps, so a loss that does not fall is a fault."""
    phrase = np.random.default_rng(0).integers(0, 50257, size=97)
    return gt.TokenWindowDataset(np.tile(phrase, 64 * (context + 1) * 8 // 97 + 1).astype(np.uint16), context)


def _losses(dtype: str, compile_: bool, steps: int = 8) -> list[float]:
    gt.seed_everything(0)
    runtime = gt.setup_runtime("cuda", dtype, compile_)
    model = runtime.prepare(gt.GPTModel(gt.get_config("small", context_length=64, vocab_multiple=64)))
    opt = gt.make_adamw(model, 3e-3, device=runtime.device)
    batches = gt.BatchSampler(_dataset(), 8, seed=1, device=runtime.device)
    tcfg = gt.TrainConfig(max_steps=steps, progress=False, log_every=0)
    return gt.Trainer(model, opt, runtime, tcfg, batches=batches).train().history["train_loss"]


@needs_gpu
def test_pinned_prefetch_gives_the_cpu_batches():
    ds = _dataset()
    on_cpu, on_gpu = gt.BatchSampler(ds, 4, seed=3), gt.BatchSampler(ds, 4, seed=3, device=CUDA)
    assert on_gpu.prefetch and on_gpu._pin
    for _ in range(5):
        (xc, yc), (xg, yg) = on_cpu.next(), on_gpu.next()
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
    assert all(t.is_pinned() for t in on_gpu._ahead[1].result())  # the next batch waits in pinned memory


@needs_gpu
def test_bf16_compiled_training_follows_fp32():
    fp32, eager, compiled = _losses("fp32", False), _losses("bf16", False), _losses("bf16", True)
    assert all(np.isfinite(compiled)) and compiled[-1] < compiled[0] - 1
    assert compiled == pytest.approx(eager, rel=2e-2)
    assert eager == pytest.approx(fp32, rel=2e-2)


@needs_gpu
def test_fp16_loss_scaling_trains():
    fp16, fp32 = _losses("fp16", False), _losses("fp32", False)
    assert fp16 == pytest.approx(fp32, rel=2e-2)
    runtime = gt.setup_runtime("cuda", "fp16")
    assert runtime.grad_scaler().is_enabled() and not gt.setup_runtime("cuda", "bf16").grad_scaler().is_enabled()


@needs_gpu
def test_compiled_cross_entropy_matches_on_cuda():
    logits = (3 * torch.randn(2048, 50304, device=CUDA)).to(torch.bfloat16)[:, :50257]
    targets = torch.randint(0, 50257, (2048,), device=CUDA)
    a, b = logits.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    fused = gt.compiled_cross_entropy()(a, targets)
    plain = torch.nn.functional.cross_entropy(b.float(), targets)
    fused.backward()
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1.6e-2, atol=1e-7)


@needs_gpu
def test_cuda_defaults_fused_adamw_tf32_padding():
    runtime = gt.setup_runtime("cuda", "auto")
    assert runtime.dtype == "bf16" and torch.backends.cuda.matmul.allow_tf32
    model = runtime.prepare(gt.GPTModel(gt.get_config("debug")))
    assert gt.make_adamw(model, 1e-3, device=runtime.device).defaults["fused"]
    no_resume = type("Run", (), {"resume_point": None})()
    assert gt.vocab_multiple_for(None, runtime, no_resume) == 64
    from gptkit.runtime import peak_flops_for

    assert peak_flops_for(CUDA) is not None, f"no peak FLOP/s known for {torch.cuda.get_device_name()}"


@pytest.fixture
def flags(small_corpus, tmp_path):
    return ["--data", str(small_corpus), "--cache_dir", str(tmp_path / "cache"), "--val_fraction", "0.2",
            "--model", "debug", "--batch_size", "4", "--warmup_steps", "3", "--lr", "2e-3", "--eval_iters", "2",
            "--no-progress", "--log_every", "1", "--seed", "5", "--device", "cuda", "--dtype", "bf16"]


@needs_gpu
def test_advanced_script_checkpoints_and_resumes_on_cuda(flags, tmp_path, capsys):
    full = adv.main([*flags, "--compile", "--run_dir", str(tmp_path / "a"), "--max_steps", "8"])
    assert "| mfu " in capsys.readouterr().out  # the log line reports MFU on a known GPU
    assert gt.load_checkpoint(full["checkpoint"])["config"]["vocab_multiple"] == 64
    adv.main([*flags, "--compile", "--run_dir", str(tmp_path / "b"), "--max_steps", "4"])
    resumed = adv.main([*flags, "--compile", "--run_dir", str(tmp_path / "b"), "--max_steps", "8", "--resume", "auto"])
    # Atomic adds in CUDA kernels (the embedding's backward) make the last bits vary from run to run.
    assert resumed["history"]["train_loss"] == pytest.approx(full["history"]["train_loss"], rel=1e-3)


def _torchrun(nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    """torchrun with the repository and whatever PYTHONPATH already holds (gpu_check.sh's wheels)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "pretraining_advanced.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=kw.get("timeout", 300))


@needs_gpu
@pytest.mark.parametrize("offload", [[], ["--cpu_offload"]], ids=["on_gpu", "cpu_offload"])
def test_fsdp_bf16_policy_under_torchrun_nccl(flags, tmp_path, offload):
    """One process: the NCCL group of one (FSDP always makes a group), the bf16 policy, CPU offload with
    its gloo side group for the host-side gradients; resumed from its sharded checkpoint."""
    for steps in ("4", "6"):
        r = _torchrun(1, [*flags, "--fsdp", *offload, "--run_dir", str(tmp_path / "f"), "--max_steps", steps,
                          "--resume", "auto"])
        assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "f" / "ckpt_00000006" / "complete.json").is_file()
    assert "resumed from" in r.stdout + r.stderr


@needs_gpu
@pytest.mark.parametrize("mode", [[], ["--fsdp", "--cpu_offload"]], ids=["ddp", "fsdp_cpu_offload"])
def test_two_nccl_processes_on_one_gpu(flags, tmp_path, mode):
    """A real 2-process NCCL run (DDP's all-reduce; FSDP with CPU offload, whose clipping norm is reduced
    on the gloo side group), both processes on GPU 0. NCCL refuses two ranks on one GPU in many
    versions ("Duplicate GPU detected"): then this is skipped, saying so."""
    r = _torchrun(2, [*flags, "--device", "cuda:0", *mode, "--run_dir", str(tmp_path / "r"), "--max_steps", "3"])
    if r.returncode != 0 and "Duplicate GPU" in r.stderr:
        pytest.skip("NCCL refuses two processes on one GPU (Duplicate GPU detected): this needs two GPUs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "weights identical on all 2 ranks: True" in r.stdout or mode


def test_gpu_benchmark_stages_run_on_cpu(small_corpus, tmp_path):
    """The GPU benchmark on the CPU with tiny models, compiled where the GPU run compiles: every stage
    in a process of its own, each row appended as it is measured, each stage's output kept."""
    out, logs = tmp_path / "results.jsonl", tmp_path / "logs"
    stages = "headline,real_run"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--stages", stages,
                        "--batch_sizes", "2", "--iters", "1", "--data", str(small_corpus), "--out", str(out),
                        "--logs", str(logs)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["environment", "headline", "real_run"]
    assert not [r for r in rows if "error" in r or "skipped" in r], rows
    assert all(r["tokens/s"] > 0 and r["loss"] > 0 and r["compile"] for r in rows if r["stage"] == "headline")
    real = next(r for r in rows if r["stage"] == "real_run")
    assert real["rc"] == 0 and real["resume rc"] == 0 and real["resumed steps"][-1] == 16  # 6 steps, then 10 more
    logged = sorted(p.name.split("-")[0] for p in logs.glob("*.log"))
    assert logged == ["headline", "real_run"]  # each stage's whole output, kept
