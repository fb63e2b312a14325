"""A folder written by Hugging Face `datasets`' save_to_disk as a data source: a Dataset (state.json,
dataset_info.json and .arrow files), or a DatasetDict (dataset_dict.json), whose "train" split is read.
Read with datasets.load_from_disk (memory-mapped), only the text column."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from gptkit.data.local import file_fingerprint
from gptkit.data.sources import DataOptions, DataSource, SourceKind, first_line, parse_mix, register_source
from gptkit.errors import UserError


def _is_saved_dataset(p: Path) -> bool:
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def claims(data: str, options: DataOptions) -> bool:
    p = Path(data)
    return p.is_dir() and (_is_saved_dataset(p) or (p / "dataset_dict.json").is_file())


def resolve(data: str, options: DataOptions) -> DataSource:
    folder = Path(data)
    if options.smollm_dir:
        raise UserError(f"--smollm_dir reads smollm:SUBSET data; --data {data} is a saved dataset: drop --smollm_dir")
    part = folder
    if not _is_saved_dataset(folder):
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{folder / 'dataset_dict.json'} cannot be read ({first_line(e)})")
        if "train" not in splits or not _is_saved_dataset(folder / "train"):
            raise UserError(f"--data {data} is a saved DatasetDict without a 'train' split (it has: "
                            f"{', '.join(map(str, splits)) or 'none'}); pass the folder of the split to train on")
        part = folder / "train"
    return DataSource("hf-disk", [str(part)], parse_mix(options.data_mix, 1), options.text_column,
                      [f"{data} (datasets.save_to_disk)"])


def _load(part: str, column: str):
    from datasets import Dataset, load_from_disk

    try:
        ds = load_from_disk(part)
    except Exception as e:
        raise UserError(f"{part} cannot be read as a saved dataset ({type(e).__name__}: {first_line(e)})")
    if not isinstance(ds, Dataset):
        raise UserError(f"{part} holds a {type(ds).__name__}, not one Dataset; pass the folder of one split")
    if column not in ds.column_names:
        raise UserError(f"{part} has no text column '{column}' (columns: {', '.join(ds.column_names)}); pass "
                        "--text_column with the right name")
    return ds


def identity(source: DataSource, known: dict | None = None) -> dict:
    """Its files by content (the .arrow data and the state that orders them)."""
    folder = Path(source.parts[0])
    known = {f["path"]: f for f in (known or {}).get("files", [])}
    files = [{**file_fingerprint(p, known.get(p.name)), "path": p.name}
             for p in sorted(folder.iterdir()) if p.suffix == ".arrow" or p.name == "state.json"]
    return {"kind": "hf-disk", "files": files, "text_column": source.text_column}


def rows(source: DataSource, i: int, skip: int, batch_size: int) -> Iterator[list[str]]:
    ds = _load(source.parts[i], source.text_column).select_columns([source.text_column])
    if skip:
        ds = ds.select(range(min(skip, len(ds)), len(ds)))
    for batch in ds.iter(batch_size=batch_size):
        yield [t if isinstance(t, str) else ("" if t is None else str(t)) for t in batch[source.text_column]]


def probe(source: DataSource) -> None:
    _load(source.parts[0], source.text_column)


register_source(SourceKind("hf-disk", claims, resolve, identity, rows, probe))
