import json

from conftest import run_script


def test_quick_json_reports_ok_for_installed_packages(tmp_path):
    r = run_script(["test_smollm.py", "--quick", "--json", "--output_dir", tmp_path / "out"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    for pkg in ("torch", "tiktoken", "datasets", "wandb", "galore-torch", "tqdm", "matplotlib", "numpy"):
        assert checks[f"package {pkg}"]["status"] == "OK", checks[f"package {pkg}"]
    assert checks["GPT-2 tokenizer (offline)"]["status"] == "OK"
    assert checks["DDP"]["status"] == "OK" and "gloo" in checks["DDP"]["detail"]
    assert not any(name.startswith("training") for name in checks)  # --quick skips the training part
    assert "Failed to load CPU gemm_4bit" not in r.stderr


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


def test_table_output(tmp_path):
    r = run_script(["test_smollm.py", "--quick", "--output_dir", tmp_path], cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("OK    package torch")
    assert any(ln.strip().startswith("hint:") for ln in lines)
    assert lines[-1].endswith("0 FAIL")
