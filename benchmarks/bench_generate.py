"""Generation speed: the KV cache against recomputing the whole sequence for each new token (what
`generate` did before the cache), greedy, on this machine. The two give the same tokens (the tests
check that in fp32); this prints how long each takes and the speed-up.

    python benchmarks/bench_generate.py                          # 124M, 32-token prompt, 512 new tokens
    python benchmarks/bench_generate.py --model small --arch modern --batch 4
"""

import argparse
import time

import torch
from _common import gt, print_table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="124M", help="size preset")
    p.add_argument("--arch", default="gpt2", help="a named set of block parts")
    p.add_argument("--prompt_tokens", type=int, default=32, help="prompt length")
    p.add_argument("--new_tokens", type=int, default=512, help="tokens to generate")
    p.add_argument("--batch", type=int, default=1, help="prompts generated together")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="precision")
    a = p.parse_args(argv)
    import pretraining_simple

    cfg = pretraining_simple.parse_args(["--model", a.model, "--arch", a.arch]).shared.model_config
    torch.manual_seed(0)
    model = gt.GPTModel(cfg).eval()
    prompt = torch.randint(0, 50257, (a.batch, a.prompt_tokens))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if a.dtype == "bf16" else torch.autocast("cpu", enabled=False)
    rows, outs = [], {}
    for name, cache in (("KV cache", True), ("recompute (before)", False)):
        with ctx:
            gt.generate(model, prompt, 4, use_cache=cache)  # warm-up
            t0 = time.perf_counter()
            outs[name] = gt.generate(model, prompt, a.new_tokens, use_cache=cache)
            seconds = time.perf_counter() - t0
        rows.append({"method": name, "seconds": round(seconds, 2),
                     "tokens/s": round(a.batch * a.new_tokens / seconds, 1)})
    speedup = rows[1]["seconds"] / rows[0]["seconds"]
    print_table(rows)
    same = torch.equal(outs["KV cache"], outs["recompute (before)"])
    print(f"{a.model} {a.arch} {a.dtype}, batch {a.batch}, {a.prompt_tokens}-token prompt, {a.new_tokens} new tokens: "
          f"{speedup:.1f}x faster with the cache; the same tokens: {same}; {torch.get_num_threads()} threads")
    return {"rows": rows, "speedup": speedup, "same_tokens": same}


if __name__ == "__main__":
    main()
