"""Runs under torchrun, as clusters run them: preempted (SIGTERM to the launcher), restarted by
torchrun's elastic agent, orphaned by a launcher killed with -9, and spread over two "nodes" on this
machine. Every case saves, stops, tells a requeue script so (run_status.py), and resumes to the losses
of an uninterrupted run. Signals fire at exact steps (tests/faults.py), so nothing here waits on timing."""

import json
import socket
import subprocess
import sys

import faults
import pytest
from conftest import ROOT, newest_checkpoint

import pretraining_advanced as adv
from gptkit.cli import EXIT_CRASHED

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


LAUNCH = [sys.executable, str(ROOT / "launch.py"), "--standalone", "--nproc_per_node", "2"]


def test_preempted_under_torchrun_the_requeue_recipe_resumes_exactly(flags, uninterrupted, tmp_path):
    """A scheduler's SIGTERM to launch.py: the workers save and stop, launch.py exits 143 with one line
    and no traceback of torch elastic's (plain torchrun exits 1 whatever its workers did)."""
    run = tmp_path / "run"
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", run], {"at_step": 3, "action": "sigterm_launcher",
                                                                            "rank": 0}, launcher=LAUNCH)
    assert r.returncode == 143 and "SIGTERM received" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "SignalException" not in r.stderr, r.stderr[-3000:]
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


# ----------------------------------------------------------------------------------------------
# What a requeue script tells apart: stopped (above), crashed, failed; and launch.py's own exit code


def test_a_crashed_rank_says_crashed_and_the_requeue_resumes_exactly(flags, uninterrupted, tmp_path):
    """Rank 1 killed with SIGKILL in step 5 (the out-of-memory killer, a lost node): rank 0 loses its
    peer mid-step. launch.py exits 75 with rank 0's one line last, run.json says crashed, and the
    requeued run continues from the step-4 checkpoint to the uninterrupted losses."""
    run = tmp_path / "run"
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", run], {"at_step": 5, "action": "sigkill", "rank": 1},
                   launcher=LAUNCH)
    assert r.returncode == EXIT_CRASHED, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: another process of this run died")
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["status"]["state"] == "crashed" and info["crashes"][-1]["checkpoint"] == 4
    status = faults.run("run_status.py", [run])
    assert status.returncode == EXIT_CRASHED and "crashed at step 4" in status.stdout
    _ok(faults.run("pretraining_advanced.py", [*flags, "--run_dir", run, "--resume", "auto"], launcher=LAUNCH))
    assert _losses(run) == uninterrupted and json.loads((run / "run.json").read_text())["crashes"] == []
    assert _logged_steps(run) == list(range(1, STEPS + 1))


def test_a_failure_a_restart_would_repeat_says_failed(flags, tmp_path):
    """Non-finite losses under torchrun: every rank stops, run.json says failed, launch.py and
    run_status.py exit 1: a requeue script does not resume it."""
    run = tmp_path / "run"
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", run, "--lr", "1e9", "--max_bad_steps", "1",
                                               "--optimizer", "adamw", "--warmup_steps", "0"], launcher=LAUNCH)
    assert r.returncode == 1 and "non-finite" in r.stderr.strip().splitlines()[-1]
    assert json.loads((run / "run.json").read_text())["status"]["state"] == "failed"
    assert faults.run("run_status.py", [run]).returncode == 1


def test_settings_every_rank_would_refuse_are_one_line_before_any_worker(flags, tmp_path):
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", tmp_path / "run", "--fsdp"], launcher=LAUNCH)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --optimizer muon orthogonalises whole matrices and cannot run on FSDP shards; use DDP (torchrun "
        "without --fsdp), or --optimizer adamw with --fsdp"]
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    r = faults.run("pretraining_advanced.py", [*flags, "--run_dir", tmp_path / "run", "--resume", tmp_path / "none.pt"],
                   launcher=LAUNCH)  # --check finds a missing --resume file too: one line, 2, every time
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "none.pt does not exist" in r.stderr


def test_a_process_killed_without_a_word_is_a_crash_counted_until_the_bound(small_corpus, tmp_path):
    """One process killed by SIGKILL says nothing: run.json still says running, nobody holds the run.
    run_status.py calls that a crash; the resumed run records it; crashes in a row from the same
    checkpoint beyond --max_crashes make it say failed, so a requeue loop ends."""
    run = tmp_path / "run"
    args = faults.train_flags(small_corpus, tmp_path / "cache", run, 6)
    assert faults.run("pretraining_advanced.py", args, {"at_step": 4, "action": "sigkill"}).returncode == -9
    status = faults.run("run_status.py", [run])
    assert status.returncode == EXIT_CRASHED and "ended without a word" in status.stdout
    # The requeued attempt dies in its first step: no progress past the step-3 checkpoint.
    assert faults.run("pretraining_advanced.py", [*args, "--resume", "auto"],
                      {"at_step": 1, "action": "sigkill"}).returncode == -9
    status = faults.run("run_status.py", [run, "--max_crashes", "1"])
    assert status.returncode == 1 and "crashed 2 times in a row from the checkpoint of step 3" in status.stdout
    assert faults.run("run_status.py", [run, "--max_crashes", "2"]).returncode == EXIT_CRASHED
    _ok(faults.run("pretraining_advanced.py", [*args, "--resume", "auto"]))
    info = json.loads((run / "run.json").read_text())
    assert info["status"]["state"] == "finished" and info["crashes"] == []
