"""smollm-corpus (HuggingFaceTB/smollm-corpus) as a data source: `smollm:SUBSET[,SUBSET...]`,
streamed from the Hugging Face hub, or read from a local snapshot (--smollm_dir, one folder per
subset) through the local files' readers. The same rows mix to the same cache either way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gptkit.data.local import find_local_files
from gptkit.data.sources import DataOptions, DataSource, SourceKind, first_line, parse_mix, register_source
from gptkit.errors import UserError

SMOLLM_REPO = "HuggingFaceTB/smollm-corpus"
SMOLLM_SUBSETS = ("cosmopedia-v2", "fineweb-edu-dedup")
SMOLLM_REFUSED = {
    "python-edu": "its rows on the hub hold only Software Heritage blob ids, not code text (the files must be "
                  "fetched from Software Heritage's S3 separately); download them yourself and pass them as local "
                  "files with --data PATH",
}


def claims(data: str, options: DataOptions) -> bool:
    return data == "smollm" or data.startswith("smollm:")


def _subsets(data: str) -> list[str]:
    names = [s for s in data.partition(":")[2].split(",") if s] or ["cosmopedia-v2"]
    for name in names:
        if name in SMOLLM_REFUSED:
            raise UserError(f"smollm-corpus subset '{name}' cannot be streamed as text: {SMOLLM_REFUSED[name]}")
        if name not in SMOLLM_SUBSETS:
            raise UserError(f"smollm-corpus has no subset '{name}'; use one of {', '.join(SMOLLM_SUBSETS)} "
                            "(e.g. --data smollm:cosmopedia-v2,fineweb-edu-dedup --data_mix 0.7,0.3)")
    return names


def resolve(data: str, options: DataOptions) -> DataSource:
    names = _subsets(data)
    weights = parse_mix(options.data_mix, len(names))
    if not options.smollm_dir:
        return DataSource("hub", names, weights, options.text_column, names)
    folders = [Path(options.smollm_dir) / name for name in names]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise UserError(f"--smollm_dir {options.smollm_dir} has no subset folder {missing[0]}; point it at a local "
                        f"snapshot of {SMOLLM_REPO} (one folder per subset)")
    notes: list[str] = []
    parts = [find_local_files(str(f), notes) for f in folders]
    return DataSource("local", parts, weights, options.text_column,
                      [f"{n} ({len(p)} file(s))" for n, p in zip(names, parts)], notes)


def open_hub_subset(subset: str):
    """The one place that touches the hub: a streaming smollm-corpus subset. Tests substitute it."""
    from datasets import load_dataset

    return load_dataset(SMOLLM_REPO, subset, split="train", streaming=True)


def identity(source: DataSource, known: dict | None = None) -> dict:
    return {"kind": "hub", "repo": SMOLLM_REPO, "subsets": source.parts, "weights": source.weights,
            "text_column": source.text_column}


def describe(source: DataSource) -> str:
    return f"{SMOLLM_REPO}:" + "+".join(f"{s}@{w:g}" for s, w in zip(source.parts, source.weights or [1.0]))


def _opened(subset: str, column: str):
    name = f"{SMOLLM_REPO}/{subset}"
    try:
        ds = open_hub_subset(subset)
        first = next(iter(ds), None)
    except Exception as e:
        raise UserError(f"could not stream {name} from the Hugging Face hub ({type(e).__name__}: {first_line(e)}); "
                        "point --data at local .txt/.jsonl/.parquet files, or at a --cache_dir built earlier")
    if first is None:
        raise UserError(f"{name} is empty: no documents to tokenize")
    if column not in first:
        raise UserError(f"{name} has no text column '{column}' (columns: {', '.join(first)}); "
                        "pass --text_column with the right name")
    return ds


def rows(source: DataSource, i: int, skip: int, batch_size: int) -> Iterator[list[str]]:
    subset, column = source.parts[i], source.text_column
    ds = _opened(subset, column).select_columns([column])
    if skip:
        ds = ds.skip(skip)
    try:
        for batch in ds.iter(batch_size=batch_size):
            yield [t or "" for t in batch[column]]
    except Exception as e:
        raise UserError(f"reading {SMOLLM_REPO}/{subset} failed ({type(e).__name__}: {first_line(e)}); run the same "
                        "command again to continue the build")


def probe(source: DataSource) -> None:
    for subset in source.parts:
        _opened(subset, source.text_column)


register_source(SourceKind("hub", claims, resolve, identity, rows, probe, describe))
