import http.server
import json
import threading
import time
from pathlib import Path

import pytest
from conftest import run_script

import gpt_train as gt
import prep_dataset as pd
from gptkit.gutenberg import prepare as prepare_module

BODY = ("CHAPTER I.\n\nIt was the best of times, it was the worst of times, and the\nend of the first line.\n\n"
        "The last line of the book.")
LICENCE = ("\n\nUpdated editions will replace the previous one.\n\n*** START: FULL LICENSE ***\n\n"
           "THE FULL PROJECT GUTENBERG LICENSE\nPLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK\n"
           "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm\n")
HEADER = ("The Project Gutenberg EBook of A Test Book, by Somebody\n\nThis eBook is for the use of anyone anywhere "
          "at no cost\n\nTitle: A Test Book\n\nLanguage: English\n\n")

VARIANTS = {
    "the": (HEADER + "*** START OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***\n\n",
            "\n\n*** END OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***" + LICENCE),
    "this": (HEADER + "*** START OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK ***\n",
             "\n*** END OF THIS PROJECT GUTENBERG EBOOK A TEST BOOK ***" + LICENCE),
    "nospace": (HEADER + "***START OF THE PROJECT GUTENBERG EBOOK A TEST BOOK***\n\n",
                "\n\n***END OF THE PROJECT GUTENBERG EBOOK A TEST BOOK***" + LICENCE),
    "small_print": ("The Project Gutenberg Etext of A Test Book\n\n**The Legal Small Print**\n\n"
                    "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\nWhy is this \"Small Print!\" "
                    "statement here? You know: lawyers.\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n",
                    "\n\nEnd of The Project Gutenberg Etext of A Test Book\n"),
    "end_of_the_ebook": (HEADER + "*** START OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***\n",
                         "\n\nEnd of the Project Gutenberg EBook of A Test Book, by Somebody\n\n"
                         "*** END OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***" + LICENCE),
    "end_of_possessive": (HEADER + "*** START OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***\n",
                          "\n\nEnd of Project Gutenberg's A Test Book, by Somebody\n" + LICENCE),
    "crlf": ((HEADER + "*** START OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***\n\n").replace("\n", "\r\n"),
             ("\n\n*** END OF THE PROJECT GUTENBERG EBOOK A TEST BOOK ***" + LICENCE).replace("\n", "\r\n")),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_boilerplate_variants(variant):
    head, tail = VARIANTS[variant]
    body = BODY.replace("\n", "\r\n") if variant == "crlf" else BODY
    stripped, found = pd.strip_gutenberg(head + body + tail)
    cleaned = pd.normalize_text(stripped)
    assert found
    assert cleaned == BODY + "\n"
    assert "Gutenberg" not in cleaned and "SMALL PRINT" not in cleaned.upper()


def test_body_phrases_like_end_of_are_not_footers():
    text = VARIANTS["the"][0] + "The End of the Revolution was near.\n\n" + BODY + VARIANTS["the"][1]
    assert pd.normalize_text(pd.strip_gutenberg(text)[0]).startswith("The End of the Revolution")


def test_normalize_keeps_prose_and_collapses_blank_runs():
    raw = "\ufeffLine one.   \r\n\r\n\r\n\r\nLine  two\twith tab.\t\n\n\n"
    assert pd.normalize_text(raw) == "Line one.\n\nLine  two\twith tab.\n"


def test_embedded_sample_is_four_real_books(sample_books):
    raw, paths = sample_books
    assert sorted(p.name for p in paths) == ["pg1661.txt", "pg16960.txt", "pg17921.txt", "pg2600.txt"]
    for p in paths:
        text = p.read_text(encoding="utf-8")
        assert "START OF TH" in text and "END OF TH" in text  # raw, as if downloaded
    word_list_tail = pd.embedded_sample_path().read_text(encoding="utf-8")[-3000:]
    assert not any(word_list_tail[-500:] in p.read_text(encoding="utf-8") for p in paths)


# The producers' credits and the transcriber's notes are gone; the author's first and last lines stay.
FIRST_AND_LAST = {
    "pg1661.txt": ("THE ADVENTURES OF", "where I believe that she has met with considerable success."),
    "pg2600.txt": ("War and Peace", "which we are not conscious."),
    "pg16960.txt": ("HISTORY", "*       *       *       *       *"),
    "pg17921.txt": ("OXFORD MEDICAL PUBLICATIONS", "tuberculosis, 138"),
}


def test_real_books_lose_boilerplate_and_keep_body(sample_books):
    raw, paths = sample_books
    for p in paths:
        r = pd.process_book(p)
        assert r.text and not r.reason and not r.warnings
        lines = r.text.strip().splitlines()
        first, last = FIRST_AND_LAST[p.name]
        assert lines[0].strip() == first
        assert lines[-1].strip().endswith(last)
        for marker in ("Project Gutenberg", "PROJECT GUTENBERG", "SMALL PRINT", "FULL LICENSE", "Michael S. Hart",
                       "Distributed Proofreading", "pgdp.net", "Jose Menendez", "Transcriber's note"):
            assert marker not in r.text, (p.name, marker)


def test_pipeline_on_sample_respects_size_limit(sample_books, tmp_path):
    raw, _ = sample_books
    out = tmp_path / "out"
    logs = []
    summary = pd.prepare(raw, out, max_size_mb=1.5, workers=2, log=logs.append)
    files = [Path(f) for f in summary["files"]]
    assert summary["books_read"] == 4 and summary["skipped"] == []
    sizes = {f.name: f.stat().st_size for f in files}
    # War and Peace (3 MB) is bigger than the cap: alone in its file, and said so.
    big = [n for n, s in sizes.items() if s > 1.5 * 2**20]
    assert len(big) == 1 and any("gets a file of its own" in m for m in logs)
    texts = [f.read_text(encoding="utf-8") for f in files]
    assert sum(t.count("<|endoftext|>") + 1 for t in texts) == 4  # no book split or dropped
    assert all(size <= 1.5 * 2**20 for name, size in sizes.items() if name not in big)
    assert "barge  palpable" not in "".join(texts)  # the word lists after the last book
    assert summary["bytes_out"] == sum(sizes.values())


def test_bad_inputs_each_get_a_reason(tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    book = VARIANTS["the"][0] + BODY + VARIANTS["the"][1]
    (d / "good.txt").write_text(book)
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02PK\x03\x04" * 100)
    (d / "latin1.txt").write_bytes((VARIANTS["the"][0] + "Caf\xe9 au lait. " + BODY + VARIANTS["the"][1]).encode("latin-1"))
    (d / "nomarkers-8.txt").write_text("Just some English text that is the kind of thing a book has in it.\n")
    (d / "french.txt").write_text(book.replace("Language: English", "Language: French"))
    (d / "boilerplate_only.txt").write_text(VARIANTS["the"][0] + VARIANTS["the"][1])
    (d / "unreadable.txt").write_text(book)
    real_read = Path.read_bytes

    def read_bytes(self):  # chmod 0 would not stop root, so the refusal is simulated
        if self.name == "unreadable.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    (d / "notes.md").write_text("not a book file")
    logs = []
    summary = pd.prepare(d, tmp_path / "out", workers=1, log=logs.append)
    skipped = dict((Path(p).name, r) for p, r in summary["skipped"])
    warnings = dict((Path(p).name, w) for p, w in summary["warnings"])
    assert skipped["empty.txt"] == "empty file"
    assert "binary" in skipped["binary.txt"]
    assert "French" in skipped["french.txt"]
    assert "no text left" in skipped["boilerplate_only.txt"]
    assert skipped["unreadable.txt"] == "unreadable: Permission denied"
    assert "cp1252" in warnings["latin1.txt"]  # Windows-1252 first: a superset of latin-1's letters
    assert "no Project Gutenberg markers" in warnings["nomarkers-8.txt"]
    out = (tmp_path / "out" / "combined_1.txt").read_text(encoding="utf-8")
    assert "Café au lait." in out and "Just some English text" in out
    assert any(m.startswith("summary:") for m in logs)


def test_missing_and_empty_dirs_are_clear_errors(tmp_path):
    with pytest.raises(pd.UserError, match="does not exist"):
        pd.prepare(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pd.UserError, match="no book files"):
        pd.prepare(tmp_path / "empty", tmp_path / "out")


def test_failure_leaves_existing_output_untouched(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.txt").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    (out / "combined_1.txt").write_text("previous good output")
    with pytest.raises(pd.UserError, match="none of the 1 files"):
        pd.prepare(d, out, log=lambda *a: None)
    assert (out / "combined_1.txt").read_text() == "previous good output"
    assert [p.name for p in out.iterdir()] == ["combined_1.txt"]


def test_cli_errors_are_one_line(tmp_path):
    r = run_script(["prep_dataset.py", "--data_dir", tmp_path / "missing"], cwd=pd.Path(pd.__file__).parent)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --data_dir") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


class _Books(http.server.BaseHTTPRequestHandler):
    """Book 7 is served, book 8 fails once with 503 (then is served), everything else is 404."""
    hits: dict = {}
    books = {"/cache/epub/7/pg7.txt": "the", "/cache/epub/8/pg8.txt": "this"}

    def do_GET(self):
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        variant = self.books.get(self.path)
        if variant is None or (variant == "this" and self.hits[self.path] < 2):
            self.send_response(404 if variant is None else 503)
            self.end_headers()
            return
        body = (VARIANTS[variant][0] + BODY + VARIANTS[variant][1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def book_server():
    _Books.hits = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Books)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_with_retries_and_skip(book_server, tmp_path):
    logs = []
    got = pd.download_books([7, 8, 9], tmp_path, mirror=book_server, backoff=0.01, log=logs.append)
    assert [p.name for p in got] == ["pg7.txt", "pg8.txt"]
    assert _Books.hits["/cache/epub/8/pg8.txt"] == 2
    assert any("book 9: not found" in m for m in logs)
    pd.download_books([7], tmp_path, mirror=book_server, log=logs.append)
    assert _Books.hits["/cache/epub/7/pg7.txt"] == 1  # already there: not fetched again
    summary = pd.prepare(tmp_path, tmp_path / "out", log=lambda *a: None)
    assert summary["books_read"] == 2


def test_download_offline_is_a_clear_error(tmp_path):
    with pytest.raises(pd.UserError, match="no book could be downloaded"):
        pd.download_books([1], tmp_path, mirror="http://127.0.0.1:9", retries=2, backoff=0.01, timeout=2,
                          log=lambda *a: None)
    assert not list(tmp_path.iterdir())


def test_plain_progress_lines_without_tqdm(tmp_path, small_corpus):
    shadow = tmp_path / "shadow" / "tqdm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('tqdm hidden by the test')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'shadow'}:{Path(pd.__file__).parent}"}
    r = run_script(["prep_dataset.py", "--sample", "--data_dir", tmp_path / "raw", "--output_dir", tmp_path / "out"],
                   cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr
    assert "cleaning: 4/4" in r.stderr
    r = run_script(["pretraining_simple.py", "--debug", "--data_dir", small_corpus, "--output_dir", tmp_path / "run"],
                   cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr
    assert "training: 20/20" in r.stderr and "step      20/20 | loss" in r.stdout


# ----------------------------------------------------------------------------------------------
# Cleaner text, the whole collection


def test_cleaning_quality_on_the_hand_marked_evaluation_set():
    import gutenberg_eval

    totals = gutenberg_eval.quality()
    assert totals["books"] >= 11 and totals["first and last right"] == totals["books"]
    assert totals["licence left"] == 0 and totals["body lost"] == 0
    assert totals["credit/note left"] == 0 < totals["credit/note left before"]


def test_a_note_that_never_closes_its_bracket_does_not_swallow_the_book():
    from gptkit.gutenberg import text as gtext

    raw = (VARIANTS["the"][0] + "[Transcriber's note: the spelling of the original has been kept.\n\nCHAPTER I.\n\n"
           "It was a dark night; the rain fell.\n\n[Illustration: THE RAIN]\n\nAnd then the wind rose.\n"
           + VARIANTS["the"][1])
    text = gtext.clean_book(raw)[0]
    assert "Transcriber" not in text
    for kept in ("CHAPTER I.", "dark night", "[Illustration: THE RAIN]", "the wind rose"):
        assert kept in text


def test_windows_1252_is_read_as_such():
    text = "\u201cWell,\u201d said he \u2014 \u2018it\u2019s nothing\u2026\u201d \u2014 and caf\u00e9."
    book = (VARIANTS["the"][0] + text + "\n\n" + BODY + VARIANTS["the"][1]).encode("cp1252")
    decoded, warnings = pd.decode_book(book)
    assert text in decoded and warnings == ["not UTF-8, read as cp1252 (Windows-1252)"]
    assert not any("\x80" <= c <= "\x9f" for c in decoded)  # no invisible C1 control characters
    assert pd.decode_book("caf\u00e9".encode("utf-8"))[1] == []
    assert pd.decode_book(b"caf\xe9 \x81")[1] == ["not UTF-8 nor cp1252, read as latin-1"]


def _book(title: str, language: str = "English") -> str:
    header = HEADER.replace("A Test Book", title).replace("Language: English", f"Language: {language}")
    return header + "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n" + f"{title}\n\n" + BODY + VARIANTS["the"][1]


@pytest.fixture
def mirror(tmp_path):
    """A mirror in miniature: book 12345 in five copies (N.txt, N-8.txt, N-0.txt, N.zip, N-0.zip), book
    777 only as a zip, book 4242 French by the catalog, book 99 not in the catalog at all."""
    import zipfile

    root = tmp_path / "mirror"
    d = root / "1" / "2" / "3" / "4" / "12345"
    d.mkdir(parents=True)
    (d / "12345.txt").write_text(_book("Plain copy"), encoding="ascii")
    (d / "12345-8.txt").write_bytes(_book("Eight bit copy").encode("cp1252"))
    (d / "12345-0.txt").write_text(_book("The UTF-8 copy \u2014 kept"), encoding="utf-8")
    for name in ("12345.zip", "12345-0.zip"):
        with zipfile.ZipFile(d / name, "w") as z:
            z.writestr(name.replace(".zip", ".txt"), _book("Zipped copy"))
    (root / "7" / "777").mkdir(parents=True)
    with zipfile.ZipFile(root / "7" / "777" / "777.zip", "w") as z:
        z.writestr("777.txt", _book("Only in a zip"))
    (root / "4" / "2" / "4" / "4242").mkdir(parents=True)
    (root / "4" / "2" / "4" / "4242" / "4242-0.txt").write_bytes(b"\x00\x01 binary: if this is read, the catalog failed")
    (root / "9" / "99").mkdir(parents=True)
    (root / "9" / "99" / "99.txt").write_text(_book("Not in the catalog"), encoding="utf-8")
    catalog = tmp_path / "pg_catalog.csv"
    catalog.write_text('Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves\n'
                       '12345,Text,2004-01-01,Five copies,en,"Somebody",,,\n'
                       '777,Text,2004-01-01,Zipped,en,"Somebody",,,\n'
                       '4242,Text,2004-01-01,Un livre,fr,"Quelqu\'un",,,\n'
                       '5000,Sound,2004-01-01,An audio book,en,,,,\n', encoding="utf-8")
    return root, catalog


def test_mirror_keeps_one_copy_per_book_and_filters_by_catalog(mirror, tmp_path):
    root, catalog = mirror
    logs = []
    summary = pd.prepare(root, tmp_path / "out", workers=1, log=logs.append,
                         selection=pd.Selection(pd.read_catalog(catalog)), progress=False)
    text = (tmp_path / "out" / "combined_1.txt").read_text(encoding="utf-8")
    assert summary["books_read"] == 3 and summary["duplicates_dropped"] == 4
    assert "The UTF-8 copy \u2014 kept" in text and "Only in a zip" in text and "Not in the catalog" in text
    assert not any(t in text for t in ("Plain copy", "Eight bit copy", "Zipped copy"))
    assert ("book 4242", "catalog: language fr, not en") in summary["skipped"]  # decided before a byte was read
    assert not any("binary" in reason for _, reason in summary["skipped"])
    assert any("duplicate copies dropped" in line for line in logs)


def test_download_all_of_a_catalog_query_politely(book_server, tmp_path):
    catalog = tmp_path / "pg_catalog.csv"
    catalog.write_text("Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves\n"
                       "7,Text,,A,en,,,,\n8,Text,,B,en,,,,\n9,Text,,C,fr,,,,\n10,Sound,,D,en,,,,\n")
    ids = pd.download_ids(pd.build_parser().parse_args(["--download", "all"]), pd.Selection(pd.read_catalog(catalog)))
    assert ids == [7, 8]
    t0 = time.monotonic()
    got = pd.download_books(ids, tmp_path / "raw", mirror=book_server, backoff=0.01, delay=0.3, log=lambda *a: None)
    assert [p.name for p in got] == ["pg7.txt", "pg8.txt"] and time.monotonic() - t0 >= 0.6  # 3 requests, 0.3 s apart
    with pytest.raises(pd.UserError, match="--download all needs --catalog"):
        pd.download_ids(pd.build_parser().parse_args(["--download", "all"]), pd.Selection())


def test_a_killed_preparation_resumes_to_identical_files(sample_books, tmp_path):
    import os
    import signal as sig

    raw, _ = sample_books
    pd.prepare(raw, tmp_path / "full", max_size_mb=1.0, workers=1, log=lambda *a: None, progress=False)
    full = {p.name: p.read_bytes() for p in (tmp_path / "full").iterdir()}
    pid = os.fork()
    if pid == 0:  # the child is killed right after it finishes its second file
        try:
            real = pd.CombinedWriter._finish_file
            count = {"n": 0}

            def finish_then_die(self):
                real(self)
                count["n"] += 1
                if count["n"] == 2:
                    os.kill(os.getpid(), sig.SIGKILL)
            pd.CombinedWriter._finish_file = finish_then_die
            pd.prepare(raw, tmp_path / "part", max_size_mb=1.0, workers=1, log=lambda *a: None, progress=False)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and not list((tmp_path / "part").glob("combined_*.txt"))  # staged, not published
    logs = []
    pd.prepare(raw, tmp_path / "part", max_size_mb=1.0, workers=1, log=logs.append, progress=False)
    assert any(line.startswith("resuming: ") for line in logs)
    part = {p.name: p.read_bytes() for p in (tmp_path / "part").iterdir()}
    assert part.keys() == full.keys() and all(part[k] == full[k] for k in full)


def test_a_kill_while_publishing_resumes_to_identical_files(sample_books, tmp_path, monkeypatch):
    """Killed after moving some staged files into place (over an earlier run's files of the same
    names): the next run finishes the move and deletes neither the moved files nor anything else."""
    import os

    raw, _ = sample_books
    quiet = dict(workers=1, log=lambda *a: None, progress=False)
    pd.prepare(raw, tmp_path / "full", max_size_mb=1.0, **quiet)
    full = {p.name: p.read_bytes() for p in (tmp_path / "full").iterdir()}
    out = tmp_path / "out"
    pd.prepare(raw, out, max_size_mb=0.6, **quiet)  # an earlier run with other files under the same names
    (out / "notes.txt").write_text("the user's")
    real, moves = os.replace, []

    def replace_then_die(src, dst):
        if Path(dst).parent == out and len(moves) == 2:
            raise KeyboardInterrupt  # the kill, after two files were moved into place
        real(src, dst)
        if Path(dst).parent == out:
            moves.append(dst)

    monkeypatch.setattr(prepare_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        pd.prepare(raw, out, max_size_mb=1.0, **quiet)
    monkeypatch.setattr(prepare_module.os, "replace", real)
    assert len(moves) == 2 and (out / pd.STAGING).is_dir()
    pd.prepare(raw, out, max_size_mb=1.0, **quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"} == full
    assert (out / "notes.txt").read_text() == "the user's"


def test_prepared_folder_is_a_data_source_as_it_is(sample_books, tmp_path):
    """What prep_dataset writes (combined files and its own hidden manifest) reads as exactly the books."""
    import token_cache as tc

    raw, _ = sample_books
    summary = pd.prepare(raw, tmp_path / "clean", max_size_mb=1.5, workers=1, log=lambda *a: None, progress=False)
    source = tc.resolve_source(str(tmp_path / "clean"))
    assert sorted(source.parts[0]) == sorted(summary["files"])


@pytest.mark.parametrize("record", ["output manifest", "staging progress"])
def test_names_in_prep_records_never_reach_outside_the_folder(sample_books, tmp_path, record):
    raw, _ = sample_books
    quiet = dict(workers=1, log=lambda *a: None, progress=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    out = tmp_path / "out"
    pd.prepare(raw, out, max_size_mb=1.0, **quiet)
    if record == "output manifest":
        path = out / pd.OUTPUT_MANIFEST
        m = json.loads(path.read_text())
        m["files"].append("../victim.txt")
    else:
        (out / pd.STAGING).mkdir()
        path = out / pd.STAGING / "progress.json"
        m = {"signature": "another input", "done": 1, "files": [{"name": str(victim), "bytes": 3}], "books_read": 1,
             "skipped": [], "warnings": [], "bytes_in": 0}
    path.write_text(json.dumps(m))
    with pytest.raises(pd.UserError, match="damaged or was edited"):
        pd.prepare(raw, out, max_size_mb=0.6, **quiet)
    assert victim.read_text() == "the user's"


def test_a_book_over_the_cap_is_skipped_with_a_warning_without_reading_it_whole(mirror, tmp_path):
    import zipfile

    root, _ = mirror
    big = root / "8" / "888"
    big.mkdir(parents=True)
    with zipfile.ZipFile(big / "888.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("888.txt", _book("A huge one") + "Lorem ipsum dolor. " * 20_000)  # ~400 KB, 3 KB zipped
    logs = []
    summary = pd.prepare(root, tmp_path / "out", workers=1, log=logs.append, progress=False, max_book_mb=0.2)
    assert summary["books_read"] == 3 and "A huge one" not in (tmp_path / "out" / "combined_1.txt").read_text()
    reason = dict(summary["skipped"])[f"{big / '888.zip'}!888.txt"]
    assert reason.startswith("0 MB, more than --max_book_mb 0.2") and "raise --max_book_mb" in reason
    assert any(line.startswith("skipped: ") and "888" in line for line in logs)
    with zipfile.ZipFile(big / "888.zip") as z:  # a member is read in a stream, never past the cap
        with pytest.raises(pd.BookTooBig):
            pd.BookRef(str(big / "888.zip"), "888.txt").read_bytes(1000)


def test_random_bytes_are_not_a_book(tmp_path):
    import random

    raw = tmp_path / "raw"
    raw.mkdir()
    rng = random.Random(0)
    (raw / "pg1.txt").write_bytes(bytes(rng.randrange(1, 256) for _ in range(200_000)))  # no NUL: not "binary"
    (raw / "pg2.txt").write_text(_book("A real one"))
    summary = pd.prepare(raw, tmp_path / "out", workers=1, log=lambda *a: None, progress=False)
    assert summary["books_read"] == 1
    assert dict(summary["skipped"])[str(raw / "pg1.txt")].startswith("not text: ")


def test_one_preparation_per_output_folder(sample_books, tmp_path):
    raw, _ = sample_books
    out = tmp_path / "out"
    out.mkdir()
    with gt.FolderLock(out / pd.LOCK, what="preparation"):  # another preparation holds it
        with pytest.raises(pd.UserError, match="is in use by pid"):
            pd.prepare(raw, out, workers=1, log=lambda *a: None, progress=False)
    pd.prepare(raw, out, workers=1, log=lambda *a: None, progress=False)
    assert not (out / pd.LOCK).exists() and list(out.glob("combined_*.txt"))


def test_symlinks_files_are_read_and_said_folders_are_not_entered(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "more").mkdir(parents=True)
    (elsewhere / "pg5.txt").write_text(_book("Linked from outside"))
    (elsewhere / "more" / "pg6.txt").write_text(_book("In a linked folder"))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "pg7.txt").write_text(_book("Inside"))
    (raw / "pg5.txt").symlink_to(elsewhere / "pg5.txt")
    (raw / "more").symlink_to(elsewhere / "more", target_is_directory=True)
    logs = []
    summary = pd.prepare(raw, tmp_path / "out", workers=1, log=logs.append, progress=False)
    text = (tmp_path / "out" / "combined_1.txt").read_text()
    assert summary["books_read"] == 2 and "Linked from outside" in text and "In a linked folder" not in text
    assert any("1 file(s) in" in line and "symlinks to files outside it" in line for line in logs)
    assert any("1 symlinked folder(s)" in line and "not entered" in line for line in logs)
