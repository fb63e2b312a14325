import json

from conftest import run_script

import test_smollm


def test_quick_json_reports_ok_for_installed_packages(tmp_path, capsys):
    results = test_smollm.main(["--quick", "--json", "--output_dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert not any(c.status == "FAIL" for c in results), out
    checks = {c["name"]: c for c in json.loads(out)}
    for pkg in ("torch", "tiktoken", "datasets", "wandb", "galore-torch", "tqdm", "matplotlib", "numpy"):
        assert checks[f"package {pkg}"]["status"] == "OK", checks[f"package {pkg}"]
    assert checks["GPT-2 tokenizer (offline)"]["status"] == "OK"
    precision = checks["precision (--dtype auto)"]
    assert precision["status"] == "OK" and precision["detail"].startswith(("fp32 on cpu (auto: ", "bf16 on cpu (auto: "))
    assert checks["DDP"]["status"] == "OK" and "gloo" in checks["DDP"]["detail"]
    assert not any(name.startswith("training") for name in checks)  # --quick skips the training part
    assert "Failed to load CPU gemm_4bit" not in err


def test_hidden_package_is_a_fail_with_a_hint(tmp_path):
    fake = tmp_path / "shadow" / "tqdm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    r = run_script(["test_smollm.py", "--quick", "--json", "--output_dir", tmp_path / "out"], cwd=tmp_path,
                   env_extra={"PYTHONPATH": f"{tmp_path / 'shadow'}:{run_script.__globals__['ROOT']}"})
    assert r.returncode == 1
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["package tqdm"]["status"] == "FAIL"
    assert "hidden by the test" in checks["package tqdm"]["detail"]
    assert "pip install -r requirements.txt" in checks["package tqdm"]["hint"]
    assert checks["package numpy"]["status"] == "OK"


def test_table_output(tmp_path, capsys):
    test_smollm.main(["--quick", "--output_dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("OK    package torch")
    assert any(ln.strip().startswith("hint:") for ln in lines)
    assert lines[-1].endswith("0 FAIL")


def test_a_torch_that_computes_wrong_fails_the_check(monkeypatch):
    import torch

    assert test_smollm.torch_works(torch).status == "OK"
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kw: v * 0)
    check = test_smollm.torch_works(torch)
    assert check.status == "FAIL" and "attention" in check.detail
