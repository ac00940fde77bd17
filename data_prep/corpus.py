"""Stream documents out of local text/json/parquet/arrow files, or Hub datasets, via HF `datasets`.

An input is a file, a glob, or `hf:<dataset>[:<config>][@<split>]`: a Hub dataset name or a
local dataset folder, streamed (nothing is downloaded up front), split `train` by default.
Every failure raises DataPrepError with a one-line message naming the input, because a
bad shard found an hour into a build is only useful if the error says which one.
"""

import glob
import os
from typing import TYPE_CHECKING, Iterator

from datasets import load_dataset

if TYPE_CHECKING:
    from data_prep.progress import ReadProgress


class DataPrepError(ValueError):
    """A problem with the user's inputs, reported as one line (the CLI exits 2)."""


HUB_PREFIX = "hf:"


def is_hub_input(spec: str) -> bool:
    return spec.startswith(HUB_PREFIX)


def parse_hub_input(spec: str) -> tuple[str, str | None, str]:
    """`hf:<dataset>[:<config>][@<split>]` -> (dataset, config or None, split)."""
    rest, at, split = spec[len(HUB_PREFIX) :].partition("@")
    name, colon, config = rest.partition(":")
    if not name or (colon and not config) or (at and not split):
        raise DataPrepError(f"{spec}: expected hf:<dataset name or folder>[:<config>][@<split>]")
    return name, config or None, split or "train"


# Longest suffix first so "x.jsonl.gz" matches ".jsonl.gz" rather than nothing.
_BUILDERS = {
    ".txt": "text",
    ".txt.gz": "text",
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


def builder_for(path: str) -> str:
    for suffix in sorted(_BUILDERS, key=len, reverse=True):
        if path.endswith(suffix):
            return _BUILDERS[suffix]
    raise DataPrepError(f"{path}: unknown extension, expected one of {', '.join(_BUILDERS)}")


def expand_paths(paths: list[str]) -> list[str]:
    """Expand globs (sorted, so the corpus order is reproducible) and check every file exists.

    `hf:` inputs are kept as they are: whether they exist is only known once loaded.
    """
    files = []
    for pattern in paths:
        if is_hub_input(pattern):
            parse_hub_input(pattern)
            files.append(pattern)
            continue
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataPrepError(f"{pattern}: glob matched no files")
        else:
            matches = [pattern]
        for path in matches:
            if not os.path.isfile(path):
                raise DataPrepError(f"{path}: no such file")
            builder_for(path)  # fail on a bad extension before reading anything
            files.append(path)
    return files


def _gist(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _hub_records(spec: str) -> Iterator[dict]:
    name, config, split = parse_hub_input(spec)
    try:
        yield from load_dataset(name, config, split=split, streaming=True)
    except (ConnectionError, FileNotFoundError) as e:  # offline, no such dataset, no such folder
        raise DataPrepError(f"{spec}: dataset {name!r} could not be reached or found ({_gist(e)})") from e
    except Exception as e:  # a bad config or split name, a broken file in the dataset
        raise DataPrepError(f"{spec}: cannot stream dataset {name!r}: {_gist(e)}") from e


def _records(path: str) -> Iterator[dict]:
    if is_hub_input(path):
        yield from _hub_records(path)
        return
    builder = builder_for(path)
    # "paragraph" makes each blank-line separated block one document (datasets
    # decompresses .gz itself, by extension).
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    if builder in ("text", "json"):
        # Read in 1 MB steps, not datasets' 10 MB: the file offset, which the ETA goes by,
        # then runs at most 1 MB ahead of the documents handed out.
        options["chunksize"] = 1 << 20
    try:
        yield from load_dataset(builder, data_files=[path], split="train", streaming=True, **options)
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{path}: not valid UTF-8 text ({e.reason})") from e
    except Exception as e:  # pyarrow / gzip / datasets errors: keep the gist, add the file name
        raise DataPrepError(f"{path}: cannot read as {builder}: {_gist(e)}") from e


def iter_documents(
    paths: list[str], text_field: str = "text", progress: "ReadProgress | None" = None
) -> Iterator[str]:
    """Yield the non-blank documents of every file, in order, one at a time.

    `text_field` names the document column of json/parquet/arrow files and Hub datasets;
    in .txt files each paragraph is a document. `progress`, made for the same (expanded)
    inputs, is kept up to date with how far the reading has got.
    """
    for index, path in enumerate(expand_paths(paths)):
        if progress is not None:
            progress.start(index)
        is_text_file = not is_hub_input(path) and builder_for(path) == "text"
        field = "text" if is_text_file else text_field
        documents = 0
        for record in _records(path):
            if progress is not None:
                progress.rows += 1
            if field not in record:
                raise DataPrepError(f"{path}: no field {field!r} (fields present: {', '.join(record) or 'none'})")
            text = record[field]
            if not isinstance(text, str):
                raise DataPrepError(f"{path}: field {field!r} holds {type(text).__name__}, expected a string")
            if is_text_file:
                # Splitting on "\n\n" leaves the extra newlines of longer gaps on the paragraph.
                text = text.strip("\n")
            if not text.strip():
                continue
            documents += 1
            yield text
        if documents == 0:
            raise DataPrepError(f"{path}: no documents (the file is empty or all blank)")
