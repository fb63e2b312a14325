"""Data at scale, from the command line: build a token cache from a source (smollm-corpus streamed
from the Hugging Face hub, a folder saved by datasets' save_to_disk, or local .txt/.jsonl/.json/.parquet
files), look at one, or check every shard. The cache itself is gptkit/data/cache.py; the sources are
gptkit/data/ (one file per kind).

    python token_cache.py build --data 'corpus/*.parquet' --cache_dir data/cache --cache_max_tokens 1e9
    python token_cache.py inspect data/cache
    python token_cache.py verify data/cache
"""

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import json
from pathlib import Path

from gptkit.cli import run_cli
from gptkit.components import add_component_flags, settings
from gptkit.config import HelpFormatter, at_least, between
from gptkit.data.cache import (  # noqa: F401
    CACHE_VERSION,
    LOCK,
    MANIFEST,
    VAL_BLOCK_TOKENS,
    TokenCache,
    build_cache,
    load_cache,
    read_manifest,
    verify_shard,
)
from gptkit.data.sources import SOURCES, DataSource, resolve_source  # noqa: F401
from gptkit.errors import UserError
from gptkit.plugins import add_plugin_flag, preload
from gptkit.tokenizer import use_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="tokenize a source into a cache folder (resumes an interrupted build)",
                       formatter_class=HelpFormatter)
    b.add_argument("--data", required=True, help="smollm:SUBSET[,SUBSET], a saved dataset folder, or local files, "
                                                 "folders or globs (comma-separated)")
    b.add_argument("--cache_dir", type=Path, required=True, help="the cache folder (new, empty, or this cache's own)")
    b.add_argument("--text_column", default="text", help="column holding the text in json/parquet/saved datasets")
    b.add_argument("--data_mix", default=None, help="token weights of the parts of --data, e.g. 0.7,0.3")
    b.add_argument("--smollm_dir", default=None, help="a local snapshot of smollm-corpus to read smollm:SUBSET from")
    b.add_argument("--cache_max_tokens", "--max_tokens", dest="cache_max_tokens", type=float, default=None,
                   help="cap on the tokens taken from the source")
    b.add_argument("--val_fraction", type=float, default=0.01, help="share of the stream held out for validation")
    b.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress")
    b.add_argument("--tokenizer", default="gpt2", help="gpt2, or a tokenizer folder (tokenizer.py train, or a Hugging "
                                                       "Face tokenizer.json): ids as uint16, or uint32 past 65,536 ids")
    add_component_flags(b, SOURCES)  # a data source kind's own settings (--NAME_FIELD)
    for name, what in (("inspect", "print what a cache holds"), ("verify", "check every shard's sha256 and ids")):
        s = sub.add_parser(name, help=what, formatter_class=HelpFormatter)
        s.add_argument("cache_dir", type=Path, help="a token cache folder")
    for sub_parser in (p, *sub.choices.values()):  # before or after the command
        add_plugin_flag(sub_parser)
    return p


def _check_build(args) -> None:
    for name, ok, what in (("cache_max_tokens", at_least(1), "a number of tokens >= 1"),
                           ("shard_tokens", at_least(VAL_BLOCK_TOKENS), f"at least {VAL_BLOCK_TOKENS}"),
                           ("val_fraction", between(0, 1), "between 0 and 1")):
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise UserError(f"--{name} must be {what}, got {value}")


def main(argv=None) -> dict:
    preload(argv)  # a plugin's data sources and file formats
    args = build_parser().parse_args(argv)
    if args.command == "build":
        _check_build(args)
        use_tokenizer(args.tokenizer)
        source = resolve_source(args.data, args.text_column, args.data_mix, args.smollm_dir,
                                {name: settings(spec, args) for name, spec in SOURCES.configured()})
        return build_cache(source, args.cache_dir, max_tokens=int(args.cache_max_tokens) if args.cache_max_tokens else None,
                           val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, progress=args.progress)
    cache = load_cache(args.cache_dir, verify=args.command == "verify", any_tokenizer=True)
    m = cache.manifest
    summary = {k: m[k] for k in ("source_description", "documents", "train_tokens", "val_tokens", "shards_written",
                                 "val_fraction", "max_tokens")}
    summary.update(tokenizer=m.get("tokenizer"), dtype=m.get("dtype", "uint16"))
    summary["verified"] = args.command == "verify"
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_cli(main)
