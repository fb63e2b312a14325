"""The text of a Project Gutenberg book without what Project Gutenberg added to it: pure functions of
a book's bytes or text, no files (gptkit/gutenberg/prepare.py does the reading and writing).

What comes off, in order:
1. The header, footer and licence: everything before the START marker (or, in files from before
   ~2003, before the end of "THE SMALL PRINT!") and from the END marker on.
2. Producer credits at the top of the body: "Produced by ... and the Online Distributed Proofreading
   Team at http://www.pgdp.net", "This etext was produced from the 1891 edition by ...", "Transcribed
   from the ... edition by David Price, email ...", "E-text prepared by ...", "Entered by ...",
   "(Additional editing by ...)", "This file was produced from images generously made available by
   ...", and the note that an HTML version exists.
3. Transcriber's notes: a bracketed "[Transcriber's note: ...]" anywhere (to its closing bracket,
   however many lines), one boxed in +----+ or a rule of dashes, and a "Transcriber's Note(s)" section
   at the start or the end (the heading and the note paragraphs under it).
Only paragraphs that say so are removed: a paragraph is taken as a credit or note by its own first
words, never by position alone, so the author's text is kept.
"""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------------------------
# Header, footer, licence

START_RE = re.compile(r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)\b.*$", re.I | re.M)
# Old files (before ~2003) open with the licence and close it with this line; the body follows.
SMALL_PRINT_END_RE = re.compile(r"^[ \t]*\*END\*?[ \t]*THE SMALL PRINT!.*$", re.I | re.M)
END_RE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|End of (?:the |this )?Project Gutenberg(?:'s|\u2019s)?\b).*$", re.I | re.M)
LICENCE_END_RE = re.compile(r"^[ \t]*(?:\*END\*?[ \t]*THE SMALL PRINT!.*\*END\*|\*{3}[ \t]*END: FULL LICENSE[ \t]*\*{3})[ \t]*$",
                            re.I | re.M)
TITLE_LINE_RE = re.compile(r"^(?:The )?Project Gutenberg(?:'s| E-?Book of| Etext of)", re.I | re.M)
LANGUAGE_RE = re.compile(r"^Language:[ \t]*(.+?)[ \t]*$", re.I | re.M)
EBOOK_ID_RE = re.compile(r"\[E(?:Book|text) #(\d+)\]", re.I)
COMMON_ENGLISH = frozenset(
    "the of and to a in that is was he for it with as his on be at by i had not are but from or have an "
    "they which you were her all she there would their we him been has when who will more no if out so".split())


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """The body of a Gutenberg book without header, footer and licence; the flag says whether
    Gutenberg markers were found (without them the text is returned whole)."""
    start = START_RE.search(text)
    body_start = start.end() if start else None
    if start is None:
        small_print = SMALL_PRINT_END_RE.search(text)
        first_end = END_RE.search(text)
        if small_print and (first_end is None or small_print.start() < first_end.start()):
            body_start = small_print.end()
    end = END_RE.search(text, body_start or 0)
    if body_start is None and end is None:
        return text, False
    return text[body_start or 0 : end.start() if end else len(text)], True


# ----------------------------------------------------------------------------------------------
# Credits and transcriber's notes

# Not "edited", "compiled" or "translated": those credit the printed book, which is the author's text.
_VERB = (r"(?:produced|prepared|transcribed|scanned|entered|digiti[sz]ed|typed|proof-?read|proofed|converted|created|"
         r"formatted|marked[- ]up|html-?ized|uploaded)")
# The first words of a credit paragraph.
_CREDIT_RE = re.compile(
    r"^[\s(\[]*(?:"
    rf"(?:this|the)\s+(?:e-?text|e-?book|electronic\s+(?:text|edition|version)|file|text|edition|html\s+version)"
    rf"(?:\s+of\s+[^.]{{0,80}}?)?\s+(?:was|is|has\s+been|were)\s+(?:first\s+|originally\s+|kindly\s+)?{_VERB}\b"
    rf"|(?:e-?text|e-?book|html\s+version|text\s+file|html\s+file)\s+(?:was\s+)?{_VERB}\b"
    rf"|{_VERB}(?:,?\s+(?:and|&)\s+{_VERB})*\s+(?:by|from|for|with|in)\b"
    # "A Millennium Fulcrum Edition produced in 1991 by ...", "[A ... Edition (c)1991 by ...]",
    # "Electronic Edition by ...": an edition statement naming who made the etext
    r"|(?:an?\s+|the\s+)?(?:[\w-]+\s+){0,4}(?:edition|e-?text|electronic\s+(?:edition|version|text))"
    rf"\s+(?:\(c\)\s*\d{{4}}\s+)?(?:(?:was\s+)?(?:first\s+)?{_VERB}\s+)?(?:in\s+\d{{4}}\s+)?by\b"
    r"|additional\s+(?:editing|proofing|corrections?|proofreading)\b"
    r"|(?:further\s+)?corrections?\s+(?:by|made\s+by)\b"
    r"|credits?\s*:"
    r"|note:\s+project\s+gutenberg\s+also\s+has\s+an\s+html\s+version"
    r"|(?:an?\s+)?html\s+version\s+(?:of\s+this\s+(?:e-?book|file)\s+)?is\s+(?:also\s+)?available"
    r")", re.I)
# Words that mark a paragraph as the producers' (a credit's wrapped lines carry them too).
_CREDIT_WORDS_RE = re.compile(r"distributed\s+proofread|pgdp\.net|online\s+distributed|internet\s+archive|"
                              r"images\s+generously|project\s+gutenberg|@|e-?mail|https?://|www\.|digiti[sz]ation|"
                              r"copyright\s+(?:was\s+)?(?:initially\s+)?claimed|\be-?texts?\b|proofreaders?\b", re.I)
# What may follow a producer credit as a paragraph of its own: an address ("alight@vnet.net") or the
# date it was released ("Released to the public June 1998").
_CREDIT_TAIL_RE = re.compile(
    r"^[\s(<\[]*(?:(?:e-?mail:?\s*)?[\w.+-]+@[\w-]+(?:\.[\w-]+)+|https?://\S+|www\.\S+)[\s)>\].,]*$"
    r"|^\s*(?:first\s+)?released\s+(?:to\s+the\s+public\s+)?(?:on\s+|in\s+)?(?:[A-Z][a-z]+\.?\s+)?(?:\d{1,2},?\s+)?"
    r"\d{4}\.?\s*$", re.I)
_NOTE_HEAD_RE = re.compile(r"^[\s\[(|*_=-]*(?:original\s+)?"
                           r"(?:transcriber'?s?|transcription|producer'?s?|e-?text\s+editor'?s?)['\u2019]?s?"
                           r"\s+(?:notes?|remarks?)\b", re.I)
_NOTE_WORDS_RE = re.compile(
    r"correct|chang|typo|spell|hyphen|inconsisten|original|print|normali[sz]|retain|standardi|silent|footnote|"
    r"\bpages?\b|illustrat|italic|punctuat|variant|obvious|error|omit|moved|symbol|character|render|"
    r"transcri|preserved|version|accent|mark|\bp\.\s*\d|_[^_]+_|\[|\]", re.I)
# The top or bottom of a box drawn around a note (asterisk rows are section breaks, not boxes).
_BOX_RULE_RE = re.compile(r"^\s*(?:\+[-=]{5,}\+?|[-=_]{10,})\s*$")
LEAD_PARAGRAPHS = 8  # credits and notes are looked for among the body's first paragraphs...
TAIL_PARAGRAPHS = 40  # ...and a notes section that runs to the end among its last ones
MAX_CREDIT_LINES = 8


def _paragraphs(lines: list[str]) -> list[tuple[int, int]]:
    """(first, end) line index ranges of the blank-line separated paragraphs."""
    out, start = [], None
    for i, line in enumerate(lines + [""]):
        if line.strip() and start is None:
            start = i
        elif not line.strip() and start is not None:
            out.append((start, i))
            start = None
    return out


_CONNECTORS = frozenset("and & of the with from for at in de van von der la le da du del help assistance".split())


def _names_only(text: str) -> bool:
    """Whether what follows the first "by" reads as a list of names ("David Widger", "Judith Boss,
    Omaha, Nebraska, with the help of Mary Jones"), not as a sentence ("by long habit, the silence...")."""
    _, by, rest = text.partition(" by ")
    words = [w for w in re.findall(r"[^\W\d_][\w'.-]*", rest if by else "") if w.lower() not in _CONNECTORS]
    return 0 < len(words) <= 30 and sum(w[0].isupper() for w in words) >= 0.8 * len(words)


def _is_credit(par: list[str]) -> bool:
    """A producer credit: it opens like one, and either names the producers' world (DP, pgdp.net, an
    archive, an e-mail or web address) or is followed by nothing but names."""
    text = " ".join(s.strip() for s in par)
    return len(par) <= MAX_CREDIT_LINES and bool(_CREDIT_RE.match(text)) and (
        bool(_CREDIT_WORDS_RE.search(text)) or _names_only(text))


def _bracket_end(lines: list[str], i: int, col: int, limit: int = 400) -> tuple[int, int] | None:
    """(line, column after) of the bracket closing the one at lines[i][col], within `limit` lines."""
    depth = 0
    for j in range(i, min(len(lines), i + limit)):
        for k in range(col if j == i else 0, len(lines[j])):
            depth += {"[": 1, "]": -1}.get(lines[j][k], 0)
            if depth == 0:
                return j, k + 1
    return None


_BRACKET_NOTE_RE = re.compile(r"\[\s*(?:transcriber|transcription|producer)['\u2019]?s?\s+notes?\b", re.I)
_LIST_ITEM_RE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|\(?[a-z]\))\s")


def _paragraph_bracket_end(lines: list[str], i: int, limit: int = 60) -> tuple[int, int] | None:
    """When the brackets inside a note do not balance (a list item's stray "["), the note ends at the
    first line after it that closes a paragraph with "]", if every paragraph up to there reads as a
    note: it speaks of corrections, spelling, printing... or is a list of such items."""
    for j in range(i, min(len(lines), i + limit)):
        if lines[j].rstrip().endswith("]") and (j + 1 == len(lines) or not lines[j + 1].strip()):
            pars = " ".join(s.strip() or "\n" for s in lines[i : j + 1]).split("\n")
            ok = all(_NOTE_WORDS_RE.search(p) or _LIST_ITEM_RE.match(p) for p in pars if p.strip())
            return (j, len(lines[j].rstrip())) if ok else None
    return None


def _remove_bracketed_notes(lines: list[str]) -> tuple[list[str], list[str]]:
    """Remove every "[Transcriber's note ...]" (to its closing bracket); returns the lines kept and
    the lines dropped or shortened."""
    out, removed, i = [], [], 0
    while i < len(lines):
        pair = lines[i] + (" " + lines[i + 1] if i + 1 < len(lines) else "")  # "[Transcriber's" / "note: ..."
        m = _BRACKET_NOTE_RE.search(pair)
        m = m if m and m.start() < len(lines[i]) else None
        close = (_bracket_end(lines, i, m.start()) or _paragraph_bracket_end(lines, i)) if m else None
        if close is None:
            out.append(lines[i])
            i += 1
            continue
        j, k = close
        rest = (lines[i][: m.start()] + lines[j][k:]).rstrip()
        removed += lines[i : j + 1]
        if rest.strip():
            out.append(rest)
        i = j + 1
    return out, removed


def _remove_boxed_notes(lines: list[str]) -> tuple[list[str], list[str]]:
    """A note inside a box (+---+ or a rule of dashes) that says it is the transcriber's."""
    i, removed = 0, []
    while i < len(lines):
        if _BOX_RULE_RE.match(lines[i]):
            close = next((j for j in range(i + 1, min(len(lines), i + 80)) if _BOX_RULE_RE.match(lines[j])), None)
            inside = [s.strip(" |") for s in lines[i + 1 : close] if s.strip(" |")] if close else []
            if inside and any(_NOTE_HEAD_RE.match(s) for s in inside[:2]):
                removed += lines[i : close + 1]
                lines = lines[:i] + lines[close + 1 :]
                continue
        i += 1
    return lines, removed


def _note_section(lines: list[str], pars: list[tuple[int, int]], k: int) -> int:
    """How many paragraphs from pars[k] (a "Transcriber's Note(s)" heading or paragraph) make up the
    notes section: the heading's own text, then paragraphs that read as notes (each short, each with
    note words), up to the first one that does not."""
    a, b = pars[k]
    n = 1
    heading_only = b - a == 1 and len(lines[a].strip()) < 40
    while heading_only and k + n < len(pars):
        a, b = pars[k + n]
        par = lines[a:b]
        if b - a > 12 or not all(_NOTE_WORDS_RE.search(s) or len(s.strip()) < 25 for s in par[:1]) or \
                not _NOTE_WORDS_RE.search(" ".join(par)):
            break
        n += 1
    return n


def remove_credits_and_notes(body: str) -> tuple[str, list[str]]:
    """The body without producer credits and transcriber's notes (see the module's docstring), and
    the lines removed. `body` is normalised text: "\\n" line ends, paragraphs split by blank lines."""
    lines = body.split("\n")
    lines, bracketed = _remove_bracketed_notes(lines)
    lines, boxed = _remove_boxed_notes(lines)
    pars = _paragraphs(lines)
    drop = _lead_credits_and_notes(lines, pars) | _producer_notes(lines, pars)
    drop |= _notes_at_the_end(lines, pars, drop)
    gone = {i for k in drop for i in range(*pars[k])}
    removed = bracketed + boxed + [line for i, line in enumerate(lines) if i in gone]
    kept = [line for i, line in enumerate(lines) if i not in gone]
    return "\n".join(kept), removed


def _lead_credits_and_notes(lines: list[str], pars: list[tuple[int, int]]) -> set[int]:
    """Credits (and what trails them: an address, a release date) and note sections among the body's
    first paragraphs."""
    drop: set[int] = set()
    k = 0
    while k < min(len(pars), LEAD_PARAGRAPHS + len(drop)):
        a, b = pars[k]
        if _is_credit(lines[a:b]):
            drop.add(k)
            k += 1
            while k < len(pars) and all(_CREDIT_TAIL_RE.match(s) for s in lines[slice(*pars[k])]):
                drop.add(k)
                k += 1
        elif _NOTE_HEAD_RE.match(lines[a]):
            n = _note_section(lines, pars, k)
            drop.update(range(k, k + n))
            k += n
        else:
            k += 1
    return drop


def _producer_notes(lines: list[str], pars: list[tuple[int, int]]) -> set[int]:
    """Anywhere in the book: a "Transcriber's Notes" heading alone on its line, followed by paragraphs
    about how the etext was made (they name the producers' world: etexts, Project Gutenberg,
    proofreaders...). Moby-Dick's "Original Transcriber's Notes:" sits after its table of contents."""
    drop: set[int] = set()
    for k, (a, b) in enumerate(pars):
        if b - a != 1 or len(lines[a].strip()) > 60 or not _NOTE_HEAD_RE.match(lines[a]):
            continue
        n = 1
        while k + n < len(pars) and _CREDIT_WORDS_RE.search(" ".join(lines[slice(*pars[k + n])])):
            n += 1
        if n > 1:
            drop.update(range(k, k + n))
    return drop


def _notes_at_the_end(lines: list[str], pars: list[tuple[int, int]], drop: set[int]) -> set[int]:
    """A "Transcriber's Note(s)" section that runs to the end of the book."""
    for k in range(max(0, len(pars) - TAIL_PARAGRAPHS), len(pars)):
        a, _ = pars[k]
        if k not in drop and _NOTE_HEAD_RE.match(lines[a]):
            n = _note_section(lines, pars, k)
            if k + n == len(pars):  # a section at the end runs to the end: nothing of the book after it
                return set(range(k, k + n))
    return set()


# ----------------------------------------------------------------------------------------------
# Text form, language, encoding


def normalize_text(text: str) -> str:
    """Unix line ends, no trailing spaces, at most one blank line in a row, no BOM or zero-width
    characters; the words and line structure of the prose are left alone."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "").replace("\u200b", "")
    text = re.sub(r"[ \t\u00a0]+$", "", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n").strip() + "\n" if text.strip() else ""


def text_problem(text: str) -> str | None:
    """Why decoded bytes are not a text at all (random or binary data read as cp1252/latin-1), or None:
    prose has next to no control characters, and is mostly letters and spaces."""
    sample = text[:1_000_000]
    if not sample:
        return None
    control = sum(1 for ch in sample if (ch < " " and ch not in "\t\n\r\f") or "\x7f" <= ch <= "\x9f")
    if control > 0.001 * len(sample):
        return f"not text: {100 * control / len(sample):.1f}% control characters (a binary or damaged file?)"
    plain = sum(1 for ch in sample if ch.isalpha() or ch.isspace())
    if plain < 0.6 * len(sample):
        return f"not text: only {100 * plain / len(sample):.0f}% letters and spaces"
    return None


def detect_language(raw: str, body: str) -> str | None:
    """None if the book is English, else the reason it is not."""
    m = LANGUAGE_RE.search(raw[:20000])
    if m:
        lang = m.group(1)
        return None if lang.lower().startswith("english") else f"language is {lang}, not English"
    words = re.findall(r"[a-z]+", body[:200000].lower())
    if not words:
        return None
    share = sum(w in COMMON_ENGLISH for w in words) / len(words)
    return None if share >= 0.15 else f"does not look like English ({100 * share:.0f}% common English words)"


def decode_book(data: bytes) -> tuple[str, list[str]]:
    """Text and warnings. UTF-8 (with or without BOM) first; else Windows-1252, which is what old
    8-bit Gutenberg files mostly are (its curly quotes, dashes and ellipsis sit where latin-1 has
    invisible control characters); latin-1 only for bytes cp1252 leaves undefined."""
    if b"\x00" in data[:8192]:
        raise ValueError("binary file, not text")
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), ["not UTF-8, read as cp1252 (Windows-1252)"]
    except UnicodeDecodeError:
        return data.decode("latin-1"), ["not UTF-8 nor cp1252, read as latin-1"]


def clean_book(raw: str) -> tuple[str, bool]:
    """A raw book's normalised body without boilerplate, credits and notes, and whether Gutenberg
    markers were found."""
    body, found = strip_gutenberg(raw)
    text, _ = remove_credits_and_notes(normalize_text(body))
    return normalize_text(text), found
