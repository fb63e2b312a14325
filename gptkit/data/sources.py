"""Where documents come from, pluggable. A `--data` value is resolved by the first registered
SourceKind that claims it (built-ins: smollm-corpus on the hub or in a local snapshot, a folder saved
by `datasets.save_to_disk`, and local .txt/.jsonl/.json/.parquet files, folders or globs). Every kind
gives a DataSource: one or more parts mixed by tokens, an identity a cache records and checks, and
rows of document texts read from any row on (so an interrupted cache build resumes).

How to add a data source: write gptkit/data/NAME.py with the five functions of a SourceKind
(claims, resolve, identity, rows, probe; describe is optional) and `register_source(SourceKind(...))`
there, then add the module to BUILTIN_SOURCES below (or import it before the command line is read,
as tests/test_plugins.py does). A new local file format is a FileFormat in gptkit/data/local.py's
registry instead.
"""

from __future__ import annotations

import importlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from gptkit.config import finite
from gptkit.errors import UserError
from gptkit.registry import Registry
from gptkit.tokenizer import encode_rows, get_tokenizer


@dataclass
class DataOptions:
    """The settings a source kind may read besides the --data value."""
    text_column: str = "text"
    data_mix: str | None = None  # token weights of the parts
    smollm_dir: str | None = None  # a local snapshot of smollm-corpus
    settings: dict = field(default_factory=dict)  # {kind name: its settings} of the kinds that have a config


@dataclass
class DataSource:
    """Documents from one or more parts (hub subsets, local file groups, ...) mixed by tokens with
    `weights`. `kind` names the SourceKind that reads it; `parts` are that kind's own."""
    kind: str
    parts: list
    weights: list[float] | None = None
    text_column: str = "text"
    names: list[str] = field(default_factory=list)  # how each part is called in messages
    notes: list[str] = field(default_factory=list)  # what the user should know about how it was read

    def identity(self, known: dict | None = None) -> dict:
        """What a cache records to know its source again (content, not paths, where it can)."""
        import json

        # As the manifest will hold it (tuples become lists), so a cache compares equal to its source.
        return json.loads(json.dumps(source_kind(self.kind).identity(self, known)))

    def describe(self) -> str:
        return source_kind(self.kind).describe(self)

    def rows(self, i: int, skip: int = 0, batch_size: int = 512) -> Iterator[list[str]]:
        """Part i's document texts in lists, from row `skip` on."""
        return source_kind(self.kind).rows(self, i, skip, batch_size)

    def probe(self) -> None:
        """Open every part and check its text column: a wrong --data or --text_column fails at once."""
        source_kind(self.kind).probe(self)


def describe_parts(source: DataSource) -> str:
    weights = source.weights or [1.0]
    return " + ".join(f"{n}" + (f"@{w:g}" if source.weights else "") for n, w in zip(source.names, weights))


@dataclass(frozen=True)
class SourceKind:
    name: str  # the DataSource.kind it reads
    claims: Callable[[str, DataOptions], bool]  # whether a --data value is this kind's
    resolve: Callable[[str, DataOptions], DataSource]
    identity: Callable[[DataSource, dict | None], dict]
    rows: Callable[[DataSource, int, int, int], Iterator[list[str]]]  # (source, part, skip, batch size)
    probe: Callable[[DataSource], None]
    describe: Callable[[DataSource], str] = describe_parts
    config: type | None = None  # a dataclass of its own settings (flags --NAME_FIELD); resolve finds them in
    #                             options.settings[name] (its identity should record what changes the data)


SOURCES: Registry[SourceKind] = Registry("data source")


def register_source(kind: SourceKind, first: bool = True) -> SourceKind:
    """Register a kind; `first` puts it before the others, so it is asked before the catch-all local files."""
    SOURCES.add(kind)  # a name that is taken is refused
    items = [(kind.name, kind)] + [(k, v) for k, v in SOURCES.items() if k != kind.name]
    if not first:
        items = items[1:] + items[:1]
    SOURCES.clear()
    SOURCES.update(items)
    return kind


def source_kind(name: str) -> SourceKind:
    if name not in SOURCES:
        raise UserError(f"this cache or source was made by a data source kind {name!r} that is not registered here; "
                        f"known kinds: {', '.join(SOURCES)}")
    return SOURCES[name]


def resolve_source(data: str, text_column: str = "text", data_mix: str | None = None,
                   smollm_dir: str | None = None, settings: dict | None = None, given: set[str] = frozenset()) -> DataSource:
    """The DataSource of a --data value: the first kind that claims it reads it. `settings` are the
    kinds' own (by name); one typed for a kind that does not claim --data is refused."""
    options = DataOptions(text_column, data_mix, smollm_dir, dict(settings or {}))
    for kind in SOURCES.values():
        if kind.claims(data, options):
            from gptkit.components import refuse_unselected

            refuse_unselected(SOURCES, kind.name, given)
            return kind.resolve(data, options)
    raise UserError(f"--data {data} is not a data source this toolkit reads")


def parse_mix(data_mix: str | None, n: int) -> list[float] | None:
    if n == 1 and not data_mix:
        return None
    try:
        weights = [float(w) for w in (data_mix or ",".join(["1"] * n)).split(",")]
    except ValueError:
        weights = []
    if len(weights) != n or not all(finite(w) and w > 0 for w in weights):
        raise UserError(f"--data_mix needs one positive weight per subset or local part of --data ({n}), "
                        f"got {data_mix!r}")
    return [w / sum(weights) for w in weights]


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Mixing: tokenized rows from every part, by tokens


class Mixer:
    """Tokenized rows from all parts, mixed by tokens: the next row always comes from the part
    furthest below its share (ties to the first), so each part's token share stays within one
    document of its weight. A part that runs out drops out and the others share its weight. The
    order depends only on the data, so hub and local copies of the same rows mix identically."""

    def __init__(self, source: DataSource, rows_done: list[int], tokens_done: list[int], batch_docs: int = 512,
                 num_threads: int | None = None):
        self.weights = source.weights or [1.0]
        self.tokens = list(tokens_done)
        self.readers = [prefetch(source.rows(i, rows_done[i], batch_docs)) for i in range(len(source.parts))]
        self.ready: list[deque] = [deque() for _ in self.readers]
        self.live = [True] * len(self.readers)
        self.tokenizer, self.num_threads = get_tokenizer(), num_threads

    def next(self) -> tuple[int, np.ndarray] | None:
        """(part, token ids of its next row), or None when every part is exhausted."""
        while any(self.live):
            total = sum(self.tokens)
            i = max((j for j in range(len(self.live)) if self.live[j]),
                    key=lambda j: (self.weights[j] * total - self.tokens[j], -j))
            if not self.ready[i]:
                batch = next(self.readers[i], None)
                if batch is None:
                    self.live[i] = False
                    continue
                self.ready[i].extend(encode_rows(batch, self.tokenizer, self.num_threads))
            ids = self.ready[i].popleft()
            self.tokens[i] += len(ids)
            return i, ids
        return None

    def close(self) -> None:
        for r in self.readers:
            r.close()


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Produce items in a background thread, so reading and parsing the next batch of documents
    overlaps with tokenizing this one (tiktoken releases the GIL). Errors surface in the consumer;
    closing the consumer (e.g. once --max_tokens is reached) stops the producer and its stream."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
        put(end)

    threading.Thread(target=produce, name="token-cache-reader", daemon=True).start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


BUILTIN_SOURCES = ("gptkit.data.local", "gptkit.data.hf_disk", "gptkit.data.smollm")  # last import is asked first
for _module in BUILTIN_SOURCES:
    importlib.import_module(_module)
