"""Runs under torchrun, as clusters run them: preempted (SIGTERM to the launcher), restarted by
torchrun's elastic agent, orphaned by a launcher killed with -9, and spread over two "nodes" on this
machine. Every case saves, stops, tells a requeue script so (run_status.py), and resumes to the losses
of an uninterrupted run. Signals fire at exact steps (tests/faults.py), so nothing here waits on timing."""

import json
import socket
import subprocess

import faults
import pytest
from conftest import newest_checkpoint

import pretraining_advanced as adv

STEPS = 8


@pytest.fixture(scope="module")
def flags(small_corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("launch_cache") / "c"
    return ["--data", str(small_corpus), "--cache_dir", str(cache), "--val_fraction", "0.2", "--model", "debug",
            "--batch_size", "4", "--warmup_steps", "3", "--lr", "2e-3", "--eval_iters", "2", "--no-progress",
            "--log_every", "1", "--seed", "5", "--dtype", "fp32", "--device", "cpu", "--eval_every", "0",
            "--sample_every", "0", "--drop_rate", "0.2", "--optimizer", "muon", "--save_every", "2", "--keep_last", "0",
            "--max_steps", str(STEPS)]


def _losses(run_dir):
    return json.loads((run_dir / "losses.json").read_text())["train_loss"]


def _logged_steps(run_dir):
    return [int(ln.split()[1].split("/")[0]) for ln in (run_dir / "train.log").read_text().splitlines()
            if ln.startswith("step ")]


def _ok(r):
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def uninterrupted(flags, tmp_path_factory):
    """2 ranks, DDP, Muon, dropout on every rank: the losses the interrupted runs must reproduce."""
    run = tmp_path_factory.mktemp("ddp") / "full"
    _ok(faults.run("pretraining_advanced.py", [*flags, "--run_dir", run], launcher=faults.torchrun(2)))
    return _losses(run)


def test_preempted_under_torchrun_the_requeue_recipe_resumes_exactly(flags, uninterrupted, tmp_path):
    run = tmp_path / "run"
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", run], {"at_step": 3, "action": "sigterm_launcher",
                                                                            "rank": 0}, launcher=faults.torchrun(2))
    assert r.returncode != 0 and "SIGTERM received" in r.stderr  # torchrun's own code: 1, whatever its workers did
    assert newest_checkpoint(run)[0] == 3
    status = faults.run("run_status.py", [run])  # what the README's recipe asks before requeueing
    assert status.returncode == 143 and "stopped at step 3 (SIGTERM)" in status.stdout
    _ok(faults.run("pretraining_advanced.py", [*flags, "--run_dir", run, "--resume", "auto"], launcher=faults.torchrun(2)))
    assert _losses(run) == uninterrupted and faults.run("run_status.py", [run]).returncode == 0
    assert _logged_steps(run) == list(range(1, STEPS + 1))  # train.log: each step once


def test_an_elastic_restart_continues_from_the_last_checkpoint(flags, uninterrupted, tmp_path):
    """A worker dies in step 5; torchrun (--max_restarts 1) restarts the group, which resumes from the
    step-4 checkpoint by itself (the command has no --resume) and ends with the uninterrupted losses."""
    run = tmp_path / "run"
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", run], {"at_step": 5, "action": "sigkill", "rank": 1},
                   launcher=faults.torchrun(2, "--max_restarts", "1"))
    _ok(r)
    assert "torchrun restarted this run: resuming from its newest checkpoint" in r.stdout + r.stderr
    assert _losses(run) == uninterrupted
    assert _logged_steps(run) == list(range(1, STEPS + 1))


def test_workers_whose_launcher_was_killed_save_and_stop(flags, uninterrupted, tmp_path):
    """kill -9 of torchrun leaves its workers running (they have sessions of their own): they notice
    their parent is gone, finish the step, save, record it, and stop."""
    run = tmp_path / "run"
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", run], {"at_step": 3, "action": "kill9_launcher",
                                                                            "rank": 0}, launcher=faults.torchrun(2))
    assert r.returncode == -9  # run() returns once the orphans have closed the launcher's pipes: they are done
    assert "the launcher" in r.stderr and "is gone" in r.stderr
    assert newest_checkpoint(run)[0] == 3
    status = faults.run("run_status.py", [run])  # resumed as in the test above
    assert status.returncode == 143 and "launcher gone" in status.stdout
    assert _losses(run) == uninterrupted[:3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_nodes(args, plan=None):
    """The README's multi-node command on one machine: two launchers, one process each, c10d rendezvous."""
    port = _free_port()
    procs = [faults.run("pretraining_advanced.py", args, plan, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        launcher=faults.torchrun(1)[:3] + ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                                                           "1", "--rdzv_backend", "c10d", "--rdzv_id", "gpt",
                                                           "--rdzv_endpoint", f"localhost:{port}"])
             for node in (0, 1)]
    return [(p, *p.communicate(timeout=300)) for p in procs]


def test_two_nodes_give_one_processs_losses_and_requeue_as_a_pair(flags, tmp_path):
    plain = [*flags, "--drop_rate", "0", "--optimizer", "adamw"]  # the same global batch: the same losses
    one = adv.main([*plain, "--run_dir", str(tmp_path / "one"), "--grad_accum", "2"])
    run = tmp_path / "two"
    nodes = _two_nodes([*plain, "--run_dir", run], {"at_step": 3, "action": "sigterm_launcher",
                                                      "rank": 0})  # SIGTERM to node 0's launcher
    assert all(p.returncode != 0 for p, _, _ in nodes) and newest_checkpoint(run)[0] == 3
    assert faults.run("run_status.py", [run]).returncode == 143
    nodes = _two_nodes([*plain, "--run_dir", run, "--resume", "auto"])
    assert all(p.returncode == 0 for p, _, _ in nodes), nodes[0][2][-3000:]
    assert _losses(run) == pytest.approx(one["history"]["train_loss"], abs=1e-5)
    assert _logged_steps(run) == list(range(1, STEPS + 1))
