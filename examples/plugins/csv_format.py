"""A user's file format, as a plugin: CSV files with a text column (--text_column). Its compressed forms
(.csv.gz, .csv.zst, ...) come from the toolkit."""

import csv
import io

from gptkit.data.local import FileFormat, register_format
from gptkit.errors import UserError


def rows(stream, path, column, batch_size):
    reader = csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8", newline=""))
    if column not in (reader.fieldnames or []):
        raise UserError(f"{path} has no column '{column}' (it has: {', '.join(reader.fieldnames or [])})")
    batch = []
    for row in reader:
        batch.append(row[column])
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def probe(stream, path, column):
    next(rows(stream, path, column, 1), None)


register_format(FileFormat("csv", (".csv",), rows, probe))
