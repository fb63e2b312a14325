"""Tokenizers of your own: train a byte-level BPE on any corpus the toolkit reads, compare tokenizers in
bytes per token, look inside one. A trained folder is what --tokenizer FOLDER takes in every script, and
what transformers' AutoTokenizer loads (the same ids).

    python tokenizer.py train --data gutenberg --vocab_size 8192 --out tokenizers/gut8k
    python tokenizer.py train --data 'corpus/*.jsonl.zst' --vocab_size 32768 --max_chars 2e9 --out tok32k
    python tokenizer.py compare gpt2 tokenizers/gut8k path/to/hf_model --data gutenberg --text notes.md
    python tokenizer.py inspect tokenizers/gut8k

`train` reads documents (an <|endoftext|> inside a text separates them), cuts each into pieces of at most
--doc_chars characters and holds out every --heldout_every-th piece (what `compare --data` measures on),
up to --max_chars characters. The split pattern is GPT-4's with numbers in groups of at most two; the
first special token marks documents (before each, --documents bos, as nanochat; or after each, eos, as
GPT-2).
"""

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from gptkit.cli import run_cli
from gptkit.components import add_component_flags, settings
from gptkit.config import HelpFormatter, add_flags, at_least, from_args, setting
from gptkit.data.sources import SOURCES, resolve_source
from gptkit.errors import UserError
from gptkit.plugins import add_plugin_flag, preload
from gptkit.progress import progress_bar
from gptkit.tokenizer import load_tokenizer
from gptkit.tokenizer_train import (
    DEFAULT_SPECIALS,
    SPLIT_PATTERN,
    Counted,
    split_documents,
    train_ranks,
    write_folder,
)


@dataclass
class CorpusArgs:
    data: str = setting("gutenberg", "the corpus: 'gutenberg' (the embedded books, cleaned), local files of any format "
                                     "(compressed too), folders or globs, smollm:SUBSET, a save_to_disk folder")
    text_column: str = setting("text", "column holding the text in json/parquet/saved datasets")
    max_chars: float | None = setting(None, "stop reading after this many characters (default: all)",
                                      check=(at_least(1), "a number >= 1"))
    doc_chars: int = setting(10_000, "cut documents into pieces of at most this many characters",
                             check=(at_least(16), "at least 16"))
    heldout_every: int = setting(10, "hold out every N-th piece for `compare --data` (0: none)",
                                 check=(at_least(0), ">= 0"))


@dataclass
class TrainArgs:
    vocab_size: int = setting(32768, "ids in all: the 256 bytes, the merges and the special tokens",
                              check=(at_least(2), "at least 2"))
    out: Path | None = setting(None, "the new tokenizer folder (required)")
    special_tokens: str = setting(",".join(DEFAULT_SPECIALS), "comma-separated special tokens; the first marks documents")
    documents: str = setting("bos", "where the document token goes: before each document (bos, as nanochat and Llama) "
                                    "or after it (eos, as GPT-2)", choices=("bos", "eos"))
    pattern: str = setting(SPLIT_PATTERN, "the split pattern (a regex): text is cut into pieces no merge crosses")
    progress: bool = setting(True, "show a progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a corpus into a tokenizer folder",
                       formatter_class=HelpFormatter)
    add_flags(t.add_argument_group("corpus"), CorpusArgs)
    add_flags(t.add_argument_group("tokenizer"), TrainArgs)
    add_component_flags(t, SOURCES)
    c = sub.add_parser("compare", help="bytes per token of tokenizers on texts, a table and a plot",
                       formatter_class=HelpFormatter)
    c.add_argument("tokenizers", nargs="+", help="gpt2, tokenizer folders, Hugging Face model folders")
    c.add_argument("--text", action="append", type=Path, default=[], help="a UTF-8 text file to measure on (repeatable)")
    add_flags(c.add_argument_group("the corpus's held-out pieces (with --data)"), CorpusArgs, data=None)
    c.add_argument("--plot", type=Path, default=None, help="write the bar plot to this PNG file")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    i = sub.add_parser("inspect", help="what a tokenizer folder holds", formatter_class=HelpFormatter)
    i.add_argument("tokenizer", help="gpt2 or a tokenizer folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    for sub_parser in (p, *sub.choices.values()):
        add_plugin_flag(sub_parser)
    return p


def corpus_rows(c: CorpusArgs, args) -> object:
    """Rows of every part of the corpus, in order (a tokenizer is trained before any token exists,
    so parts are read one after another, not mixed by tokens)."""
    data = c.data
    if data == "gutenberg":
        from gptkit.gutenberg.prepare import prepare_default_corpus

        data = str(prepare_default_corpus()[0].parent)
    source = resolve_source(data, c.text_column, None, None, {n: settings(s, args) for n, s in SOURCES.configured()})
    source.probe()
    for i in range(len(source.parts)):
        yield from source.rows(i, 0, 256)


def train(args) -> dict:
    c, t = from_args(CorpusArgs, args), from_args(TrainArgs, args)
    specials = [s.strip() for s in t.special_tokens.split(",") if s.strip()]
    if t.out is None:
        raise UserError("train needs --out FOLDER: where the tokenizer goes")
    if not specials:
        raise UserError("--special_tokens needs at least one token: the first marks documents")
    if t.vocab_size < 256 + len(specials) + 1:
        raise UserError(f"--vocab_size {t.vocab_size} cannot hold the 256 bytes, {len(specials)} special token(s) and "
                        f"one merge; use at least {256 + len(specials) + 1}")
    if t.out.exists() and (not t.out.is_dir() or any(t.out.iterdir())):
        raise UserError(f"{t.out} already exists and is not an empty folder; pick a new --out")
    bar = progress_bar(total=int(c.max_chars) if c.max_chars else None, unit="char", desc="reading") if t.progress else None
    texts = Counted(split_documents(corpus_rows(c, args), c.doc_chars, c.max_chars, c.heldout_every, False), bar)
    try:
        ranks = train_ranks(texts, t.vocab_size - len(specials), t.pattern)
    finally:
        if bar is not None:
            bar.close()
    seconds = texts.seconds()
    if texts.chars == 0:
        raise UserError(f"--data {c.data} holds no text to train on")
    trained_on = {"data": c.data, "chars": texts.chars, "bytes": texts.bytes, "doc_chars": c.doc_chars,
                  "heldout_every": c.heldout_every, "seconds": round(seconds, 2)}
    out = write_folder(t.out, ranks, specials, t.documents, t.pattern, trained_on)
    tok = load_tokenizer(out)
    print(f"wrote {out}: {tok.n_vocab:,} ids ({len(ranks) - 256:,} merges) from {texts.bytes / 1e6:,.1f} MB in "
          f"{seconds:,.1f} s ({texts.bytes / 1e6 / max(seconds, 1e-9):,.2f} MB/s)")
    return {"out": out, "vocab_size": tok.n_vocab, "trained_on": trained_on}


def compare(args) -> dict:
    texts = {str(p): _read_text(p) for p in args.text}
    if args.data:
        c = from_args(CorpusArgs, args)
        pieces = list(split_documents(corpus_rows(c, args), c.doc_chars, c.max_chars, c.heldout_every, True))
        texts[f"{c.data} (held out)"] = pieces
    if not texts:
        raise UserError("compare needs texts: --text FILE (repeatable) and/or --data SOURCE (its held-out pieces)")
    toks = {name: load_tokenizer(name, "compare") for name in args.tokenizers}
    table = {}
    for tname, tok in toks.items():
        table[tname] = {}
        for text_name, pieces in texts.items():
            pieces = pieces if isinstance(pieces, list) else [pieces]
            n_bytes = sum(len(p.encode("utf-8")) for p in pieces)
            n_tokens = sum(len(ids) for ids in tok.encode_ordinary_batch(pieces))
            table[tname][text_name] = {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1)}
    _print_table(table, toks, args.json)
    if args.plot:
        _plot(table, args.plot)
    return {"table": table, "vocab_sizes": {k: t.n_vocab for k, t in toks.items()}}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"--text {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--text {path} is not UTF-8 text (byte {e.start})")


def _print_table(table: dict, toks: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(table, indent=2))
        return
    names = list(next(iter(table.values())))
    base = next(iter(table))
    print(f"bytes per token (higher is better; the difference against {base} in brackets)")
    print(f"{'tokenizer':<28}{'vocab':>8}  " + "  ".join(f"{n[-30:]:>30}" for n in names))
    for tname, row in table.items():
        cells = []
        for n in names:
            v, ref = row[n]["bytes_per_token"], table[base][n]["bytes_per_token"]
            cells.append(f"{v:>21.3f} ({100 * (v / ref - 1):+5.1f}%)")
        print(f"{tname[-28:]:<28}{toks[tname].n_vocab:>8,}  " + "  ".join(cells))


def _plot(table: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gptkit.files import atomic_write

    names = list(next(iter(table.values())))
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(table)
    for k, (tname, row) in enumerate(table.items()):
        ax.bar([i + k * width for i in range(len(names))], [row[n]["bytes_per_token"] for n in names], width,
               label=Path(tname).name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], [Path(n).name[:24] for n in names])
    ax.set_ylabel("bytes per token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    print(f"plot: {path}")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def inspect(args) -> dict:
    tok = load_tokenizer(args.tokenizer, "inspect")
    own = json.loads(tok.files.get("gptkit_tokenizer.json") or "{}")
    sample = "Every effort moves you 12345 times."
    ids = tok.encode_ordinary(sample)
    info = {"name": tok.name, "vocab_size": tok.n_vocab, "documents": tok.documents, "document_token": tok.eot_token,
            "document_token_text": tok.decode([tok.eot_token]), "special_tokens": getattr(tok, "special", {}),
            "fingerprint": tok.fingerprint(), "cache_dtype": tok.dtype, "pattern": own.get("pattern"),
            "trained_on": own.get("trained_on"), "sample": {"text": sample, "ids": ids,
                                                            "pieces": [tok.decode([i]) for i in ids]}}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            if v is not None:
                print(f"{k:>20}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return info


def main(argv=None) -> dict:
    preload(argv)  # a plugin's data sources, file formats and tokenizer backends
    args = build_parser().parse_args(argv)
    return {"train": train, "compare": compare, "inspect": inspect}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
