"""Fault injection: SIGKILL a token-cache build or a training run at many points, resume, and check that
the result is the same as without the kills (a byte-identical cache, bit-identical losses) with nothing
left behind. Prints trials run / recovered / steps lost. The harness is the tests' own (tests/faults.py);
tests/test_run_state.py runs a few fixed trials, this runs many random ones (timers included).

    python benchmarks/bench_faults.py                      # ~3 minutes on 2 cores
    python benchmarks/bench_faults.py --cache_builds 50 --train_kills 40

Kill points: right after a progress record (the adversarial schedule: restart, wait for the next
record, kill, ...), inside atomic writes (temp file written but not renamed; renamed but the folder
not fsynced), and at random moments (a timer).
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import faults  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache_builds", type=int, default=30, help="cache builds with random kills")
    p.add_argument("--kills_per_build", type=int, default=4, help="kills in each of those builds")
    p.add_argument("--train_trials", type=int, default=4, help="training runs with random kills")
    p.add_argument("--train_kills", type=int, default=5, help="kills in each training run")
    p.add_argument("--seed", type=int, default=0, help="random seed of the kill schedule")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = faults.make_corpus(tmp / "corpus")
        import token_cache as tc

        t0 = time.perf_counter()
        m = tc.build_cache(tc.resolve_source(str(corpus)), tmp / "reference", log=lambda *a: None, **faults.CACHE_KW)
        reference = faults.folder_digest(tmp / "reference")
        records = m["records"]
        rows = []
        adv = faults.adversarial_cache_trial(corpus, tmp / "adversarial", reference)
        rows.append({"trial": "cache: kill after each record", "builds": 1, "kills": adv["kills"],
                     "recovered": int(adv["identical"]), "extra files": len(adv["extra"])})
        results = [faults.cache_trial(corpus, tmp / f"c{i}", reference,
                               faults.random_cache_plans(rng, args.kills_per_build, timers=True))
                   for i in range(args.cache_builds)]
        rows.append({"trial": "cache: random kill points", "builds": len(results),
                     "kills": sum(r["kills"] for r in results), "recovered": sum(r["identical"] for r in results),
                     "extra files": sum(len(r["extra"]) for r in results)})
        print(f"cache: {records} records per build, {time.perf_counter() - t0:.0f}s")
        steps = 24
        ref = faults.run("pretraining_advanced.py", faults.train_flags(corpus, tmp / "cache", tmp / "ref_run", steps))
        assert ref.returncode == 0, ref.stderr[-2000:]
        ref_losses = json.loads((tmp / "ref_run" / "losses.json").read_text())["train_loss"]
        trials = [faults.training_trial(corpus, tmp / f"t{i}", ref_losses,
                                        faults.random_training_plans(rng, args.train_kills, steps, timers=True), steps)
                  for i in range(args.train_trials)]
        rows.append({"trial": "training: random kill points", "builds": len(trials),
                     "kills": sum(t["kills"] for t in trials), "recovered": sum(t["recovered"] for t in trials),
                     "extra files": sum(len(t["leftovers"]) for t in trials)})
        print_table(rows)
        print(f"training steps lost to kills (redone after resume): {sum(t['steps_lost'] for t in trials)} "
              f"over {sum(t['kills'] for t in trials)} kills, checkpoints every 3 steps")
    return rows


if __name__ == "__main__":
    main()
