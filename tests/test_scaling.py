"""Scaling laws in one command: the fits recover the exponents of data made from a known law; a tiny
sweep is planned (runs that cannot fit dropped with the reason), run (finished runs skipped, a killed
sweep continued), fitted and used to predict; bad input is one line, and a fit never mixes recipes."""

import json
import random

import pytest
from conftest import run_cli

import scaling
from gptkit import scaling as S
from gptkit import tokenizer as T


@pytest.fixture(autouse=True)
def gpt2_again():
    yield
    T.use_tokenizer(None)


def test_the_fits_recover_a_known_law():
    true = S.Law(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Chinchilla's fitted law
    rng = random.Random(0)
    n, d, loss = [], [], []
    for N in (1e6, 3e6, 1e7, 3e7, 1e8):
        for D in (1e7, 3e7, 1e8, 3e8, 1e9):
            n.append(N)
            d.append(D)
            loss.append(true(N, D) * (1 + rng.gauss(0, 0.001)))
    law = S.fit_law(n, d, loss)
    assert law.alpha == pytest.approx(0.34, abs=0.01) and law.beta == pytest.approx(0.28, abs=0.01)
    assert law.E == pytest.approx(1.69, rel=0.02)
    a, b = law.exponents
    assert a == pytest.approx(0.28 / 0.62, abs=0.01) and a + b == pytest.approx(1.0)
    lo, hi = S.interval([x.alpha for x in S.bootstrap(n, d, loss, rounds=30)])
    assert lo <= 0.34 <= hi
    # The optimum at fixed C = kappa N D: no other N on the budget is better
    n_opt, d_opt = true.optimum(1e19, 6.0)
    assert n_opt * d_opt * 6.0 == pytest.approx(1e19)
    assert all(true(n_opt, d_opt) <= true(n_opt * f, d_opt / f) for f in (0.8, 0.9, 1.1, 1.25))
    # isoFLOP: the vertex of a parabola in log N
    pts = [(x, 3 + 0.1 * (__import__("math").log(x) - __import__("math").log(2e6)) ** 2) for x in (5e5, 1e6, 4e6, 8e6)]
    assert S.isoflop(pts)[0] == pytest.approx(2e6, rel=1e-6)
    assert S.power_fit([1e10, 1e11, 1e12], [2e3 * c ** 0.5 for c in (1e10, 1e11, 1e12)])[1] == pytest.approx(0.5)


def grid(law, noise=0.001, seed=0):
    rng = random.Random(seed)
    n, d, loss = [], [], []
    for N in (1e6, 3e6, 1e7, 3e7, 1e8):
        for D in (1e7, 3e7, 1e8, 3e8, 1e9):
            n.append(N)
            d.append(D)
            loss.append(law(N, D) * (1 + rng.gauss(0, noise)))
    return n, d, loss


def test_kaplans_form_is_recovered_and_the_form_that_predicts_left_out_runs_is_chosen():
    true = S.KaplanLaw(P=(8.8e13) ** 0.74, a=0.076 / 0.103, Q=5.4e13, alpha_d=0.103)  # Kaplan et al.'s fit
    n, d, loss = grid(true)
    law = S.fit_kaplan(n, d, loss)
    assert law.a == pytest.approx(true.a, abs=0.02) and law.alpha_d == pytest.approx(0.103, abs=0.005)
    assert law(3e8, 3e9) == pytest.approx(true(3e8, 3e9), rel=0.005)  # extrapolated past every run
    n_opt, d_opt = true.optimum(1e19, 6.0)
    assert n_opt * d_opt * 6.0 == pytest.approx(1e19)
    assert all(true(n_opt, d_opt) <= true(n_opt * f, d_opt / f) for f in (0.8, 0.9, 1.1, 1.25))
    assert true.exponents[0] == pytest.approx(1 / (1 + true.a))
    chinchilla = S.Law(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)
    for data_from, other in ((true, "chinchilla"), (chinchilla, "kaplan")):
        n, d, loss = grid(data_from, noise=0.002)
        errors = {name: S.loo_error(fit, n, d, loss) for name, fit in S.FORMS.items()}
        assert min(errors, key=errors.get) != other, errors


@pytest.fixture(scope="module")
def tiny_tok(small_corpus, tmp_path_factory):
    import tokenizer as tokcli

    out = tmp_path_factory.mktemp("stok") / "t300"
    tokcli.main(["train", "--data", str(small_corpus), "--vocab_size", "300", "--out", str(out), "--no-progress",
                 "--doc_chars", "2000"])
    T.use_tokenizer(None)
    return out


def recipe(small_corpus, tok):
    return ["--data_dir", str(small_corpus), "--tokenizer", str(tok), "--model", "debug", "--batch_size", "2",
            "--context_length", "32", "--dtype", "fp32", "--seed", "3", "--val_fraction", "0.2", "--lr", "3e-3"]


def test_a_tiny_sweep_is_planned_run_fitted_and_checked(small_corpus, tiny_tok, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    plan = scaling.main(["plan", "--depths", "1,2,3", "--budgets", "4e9,1.2e10", "--out", str(sweep), "--min_steps", "4",
                         "--ref_width", "128", "--eval_iters", "3", *recipe(small_corpus, tiny_tok)])
    names = [r["name"] for r in plan["runs"]]
    assert len(names) == 6 and not plan["dropped"]
    d2 = next(r for r in plan["runs"] if r["depth"] == 2)
    assert d2["flags"][d2["flags"].index("--lr") + 1] == repr(3e-3)  # width 128 = --ref_width: unscaled
    d1 = next(r for r in plan["runs"] if r["depth"] == 1)
    assert float(d1["flags"][d1["flags"].index("--lr") + 1]) == pytest.approx(3e-3 * 2 ** 0.5)  # width 64
    for r in plan["runs"]:  # each run's steps spend its budget
        assert r["steps"] * r["flops_per_token"] * 64 <= r["budget"] < (r["steps"] + 1) * r["flops_per_token"] * 64
    first = scaling.main(["run", str(sweep), "--jobs", "2"])
    assert first["ran"] == len(names) and not first["failed"]
    assert scaling.main(["run", str(sweep)])["ran"] == 0  # finished runs are skipped
    # A killed sweep continues: a run whose folder says "running" (its process gone) is run again
    one = sweep / "runs" / names[0]
    info = json.loads((one / "run.json").read_text())
    (one / "run.json").write_text(json.dumps({**info, "status": {**info["status"], "state": "running"}}))
    assert scaling.main(["run", str(sweep)])["ran"] == 1
    out = scaling.main(["fit", str(sweep), "--bootstrap", "20", "--json"])
    assert out["runs"] == 6 and (sweep / "scaling.png").is_file() and (sweep / "fit.json").is_file()
    assert len(out["approach3"]["per_budget"]) == 2 and 0 < out["approach3"]["a"] < 1
    assert out["chosen"] in out["loo_error"] and set(out["loo_error"]) <= {"chinchilla", "kaplan"}
    best = scaling.main(["predict", str(sweep), "2.4e10", "--run"])
    assert best["steps"] >= 1 and best["predicted_bpb"] > 0 and best["measured_bpb"] > 0
    checked = json.loads((sweep / f"predict-d{best['depth']}-c2.4e10" / "run.json").read_text())["settings"]
    assert checked["eval_iters"] == 3  # measured as the sweep's runs were
    # A budget where depth 1 would repeat its data: the best depth that stays within one pass
    past = d1["flops_per_token"] * plan["train_tokens"] * 1.5
    best = scaling.main(["predict", str(sweep), repr(past)])
    assert best["depth"] > 1 and best["tokens"] <= plan["train_tokens"]
    code, _, err = run_cli(scaling.main, ["predict", sweep, repr(past * 100), "--max_depth", "3"], capsys)
    assert code == 2 and "more than one pass" in err
    # Too few steps of any model: one line
    code, _, err = run_cli(scaling.main, ["predict", sweep, "10"], capsys)
    assert code == 2 and "less than one step" in err
    # A run of another recipe mixed into the sweep: refused in one line
    info = json.loads((one / "run.json").read_text())
    (one / "run.json").write_text(json.dumps({**info, "settings": {**info["settings"], "lr": 0.5}}))
    code, _, err = run_cli(scaling.main, ["fit", sweep], capsys)
    assert code == 2 and "a fit never mixes recipes" in err and len(err.strip().splitlines()) == 1, err


def test_the_submitit_executor_runs_the_same_run(small_corpus, tiny_tok, tmp_path):
    pytest.importorskip("submitit")
    sweep = tmp_path / "sweep"
    scaling.main(["plan", "--depths", "1", "--budgets", "1.5e9", "--out", str(sweep), "--min_steps", "6",
                  "--eval_iters", "2", *recipe(small_corpus, tiny_tok)])
    r = scaling.main(["run", str(sweep), "--executor", "local"])
    assert r["ran"] == 1 and not r["failed"]
    assert scaling.finished(sweep / "runs" / "d1-c1.5e09") is not None


@pytest.mark.parametrize("argv,fragment", [
    (["plan", "--depths", "", "--budgets", "1e9"], "--depths is empty"),
    (["plan", "--depths", "1,x", "--budgets", "1e9"], "give comma-separated numbers"),
    (["plan", "--depths", "1", "--budgets", "-1"], "must be a positive number"),
    (["plan", "--depths", "1,2", "--budgets", "1e3"], "every run of the grid was dropped"),
    (["fit", "NOWHERE"], "holds no plan.json"),
])
def test_bad_input_is_one_line(argv, fragment, small_corpus, tiny_tok, tmp_path, capsys):
    argv = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    if argv[0] == "plan":
        argv += ["--out", str(tmp_path / "s"), *recipe(small_corpus, tiny_tok)]
    code, _, err = run_cli(scaling.main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "s").exists()
