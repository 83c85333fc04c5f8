"""Text sources for train_tokenizer.py and tokenize_data.py: a HF hub dataset (streamed), local
.txt/.jsonl/.parquet files or folders (through `datasets`' own loaders), or the built-in corpus.

The built-in corpus ('builtin') is English text that ships inside every Python installation: the `pydoc_data`
help topics and the standard library's docstrings (about 2 MB), assembled at run time with no download, so
every stage can run offline.
"""
from __future__ import annotations

import ast
import functools
import inspect
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterator

from common import first_line
from config import DatasetOptions, UserError

BUILTIN_NAME = "builtin"
_MISSING = object()
LOCAL_LOADERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__",
                        "turtledemo"}


@functools.lru_cache(maxsize=1)
def builtin_corpus_documents() -> tuple[str, ...]:
    """The built-in corpus as documents, in a fixed order: each pydoc topic, then each docstring (module, class,
    function) of at least 40 characters from the standard library's sources, files in sorted order."""
    from pydoc_data.topics import topics

    documents = [topics[name].strip() for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for directory, subdirs, files in os.walk(stdlib):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            documents.extend(file_docstrings(Path(directory, name), 40))
    return tuple(documents)


def file_docstrings(file: Path, min_chars: int) -> list[str]:
    """The docstrings (module, class, function) of one Python source file with at least min_chars characters, in
    ast.walk order; none from a file that does not parse."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    docs = (ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return [doc for doc in docs if doc and len(doc) >= min_chars]


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_LOADERS)
    if not files:
        raise UserError(f"no .txt/.jsonl/.parquet files found in '{path}'")
    kinds = {LOCAL_LOADERS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise UserError(f"'{files[0]}' has an unsupported extension; use .txt, .jsonl, .json or .parquet")
    if len(kinds) > 1:
        raise UserError(f"'{path}' mixes file types ({', '.join(sorted(kinds))}); put one type per folder")
    return files


def _load_local(path: Path, opts: DatasetOptions):
    import datasets

    files = _local_files(path)
    loader = LOCAL_LOADERS[files[0].suffix.lower()]
    kwargs = {"sample_by": "paragraph"} if loader == "text" else {}
    return datasets.load_dataset(loader, data_files=[str(p) for p in files], split="train", streaming=True,
                                 **kwargs)


def _load_hub(opts: DatasetOptions):
    import datasets
    import huggingface_hub

    # the hub client logs every failed retry on stderr; a failure becomes one UserError line (_hub_error) instead
    huggingface_hub.utils.logging.set_verbosity_error()
    kwargs = {}
    if "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
        kwargs["trust_remote_code"] = opts.trust_remote_code
    return datasets.load_dataset(opts.dataset_path_huggingface, name=opts.dataset_sub_set or None,
                                 split=opts.dataset_split, streaming=True, **kwargs)


def _hub_error(opts: DatasetOptions, error: Exception) -> UserError:

    return UserError(f"could not read dataset '{opts.dataset_path_huggingface}' from the Hugging Face hub "
                     f"({type(error).__name__}: {first_line(error)}); check the id, --dataset_sub_set and your "
                     f"network, or pass a local .txt/.jsonl/.parquet path or '{BUILTIN_NAME}'")


def describe_source(opts: DatasetOptions) -> str:
    source = opts.dataset_path_huggingface
    if source == BUILTIN_NAME:
        return "builtin corpus (pydoc topics + stdlib docstrings)"
    if Path(source).exists():
        return f"local files at {source}"
    return f"HF hub {source}" + (f" [{opts.dataset_sub_set}]" if opts.dataset_sub_set else "") + \
        f" split={opts.dataset_split}"


def _describe_skipped(skipped: dict[str, int], column: str) -> str:
    # datasets gives a row without the column a null
    shown = {"missing": "missing", "null": "null or missing", "int": "a number", "float": "a number"}
    parts = [f"{n:,} whose '{column}' is {shown.get(kind, f'a {kind}')}" for kind, n in sorted(skipped.items())]
    return ", ".join(parts)


def iter_documents(opts: DatasetOptions, skipped: dict[str, int] | None = None) -> Iterator[str]:
    """Yield the source's documents (non-empty strings) in a deterministic order.

    A row (after the first, which must have the column) whose text column is missing or not a string (a number,
    null, a list...) is skipped and counted into `skipped` by kind ('missing', 'null', 'int', ...); a warning on
    stderr reports the counts when the rows end or the reader stops early, and a source whose every row is
    skipped is an error. Empty strings are empty documents, not counted."""
    source = opts.dataset_path_huggingface
    if source == BUILTIN_NAME:
        yield from builtin_corpus_documents()
        return
    is_local = Path(source).exists()
    if not is_local and (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in LOCAL_LOADERS):
        raise UserError(f"dataset path '{source}' does not exist")
    skipped = {} if skipped is None else skipped
    rows_read = 0
    finished = False
    try:
        dataset = _load_local(Path(source), opts) if is_local else _load_hub(opts)
        rows = iter(dataset)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            rows_read += 1
            if rows_read == 1 and opts.text_column not in row:
                raise UserError(f"the dataset has no column '{opts.text_column}' (columns: "
                                f"{', '.join(row)}); pass --text_column")
            text = row.get(opts.text_column, _MISSING)
            if isinstance(text, str):
                if text:
                    yield text
                continue
            kind = "missing" if text is _MISSING else "null" if text is None else type(text).__name__
            skipped[kind] = skipped.get(kind, 0) + 1
        finished = True
    except UserError:
        raise
    except Exception as error:  # datasets/hub raise many types; any failure to read is reported in one line
        if is_local:

            raise UserError(f"could not read '{source}' ({type(error).__name__}: {first_line(error)})") from error
        raise _hub_error(opts, error) from error
    finally:
        count = sum(skipped.values())
        if count and finished and count == rows_read:
            raise UserError(f"every row of '{source}' was skipped ({_describe_skipped(skipped, opts.text_column)})"
                            f"; pass the --text_column that holds the text")
        if count:
            print(f"warning: skipped {count:,} of the {rows_read:,} rows read from '{source}' "
                  f"({_describe_skipped(skipped, opts.text_column)})", file=sys.stderr, flush=True)


def read_rows(source: str, subset: str = "", split: str = "train", what: str = "rows") -> list[dict[str, Any]]:
    """Every row of a table dataset (the post-training stages' pairs and prompts): a local .jsonl/.json/.parquet
    file or folder, or a hub id. `what` names the rows in errors."""
    import datasets

    path = Path(source)
    try:
        if path.exists():
            files = _local_files(path)
            loader = LOCAL_LOADERS[files[0].suffix.lower()]
            if loader == "text":
                raise UserError(f"'{source}' is plain text; {what} need .jsonl or .parquet rows")
            data = datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train")
        elif source.startswith((".", "/", "~")) or path.suffix.lower() in (".jsonl", ".json", ".parquet"):
            raise UserError(f"dataset path '{source}' does not exist")
        else:
            import huggingface_hub

            huggingface_hub.utils.logging.set_verbosity_error()
            data = datasets.load_dataset(source, name=subset or None, split=split)
    except UserError:
        raise
    except Exception as error:  # datasets/hub raise many types: one line
        raise UserError(f"could not read {what} '{source}' ({type(error).__name__}: "
                        f"{first_line(error)}); pass a local .jsonl/.parquet file, a reachable hub id, or "
                        f"'builtin'") from None
    return [dict(row) for row in data]
