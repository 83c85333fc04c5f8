"""corpus.py: every kind of source the README lists (.txt with blank-line documents, .jsonl, .json, .parquet,
folders, --text_column, the built-in corpus), and its errors: a missing file or column, mixed folders, rows without
text (counted and reported; all of them skipped is an error)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import corpus
from config import DatasetOptions, UserError
from conftest import run_script


def documents(path: Path | str, **kwargs) -> list[str]:
    return list(corpus.iter_documents(DatasetOptions(dataset_path_huggingface=str(path), **kwargs)))


def test_txt_documents_are_separated_by_blank_lines(tmp_path) -> None:
    """Empty lines separate documents (several count as one); single newlines and a line of spaces do not."""
    path = tmp_path / "notes.txt"
    path.write_text("first document, line 1\nline 2\n\nsecond document\n\n\n\nthird document\n   \n"
                    "still the third\n")
    assert documents(path) == ["first document, line 1\nline 2", "second document",
                               "third document\n   \nstill the third\n"]


def test_jsonl_json_and_parquet_rows(tmp_path) -> None:
    rows = [{"text": "alpha document", "body": "one"}, {"text": "beta document", "body": "two"},
            {"text": "gamma 日本語", "body": "three"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows, ensure_ascii=False))  # a JSON array of rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    texts = [r["text"] for r in rows]
    for name in ("rows.jsonl", "rows.json", "rows.parquet"):
        assert documents(tmp_path / name) == texts, name
        assert documents(tmp_path / name, text_column="body") == ["one", "two", "three"], name


def test_folders_are_read_in_sorted_order_and_must_hold_one_type(tmp_path) -> None:
    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("from b\n\nb again\n")
    (folder / "a.txt").write_text("from a\n")
    (folder / "sub" / "c.txt").write_text("from sub/c\n")
    (folder / "ignored.md").write_text("not a source file")
    assert documents(folder) == ["from a\n", "from b", "b again\n", "from sub/c\n"]
    (folder / "d.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match="mixes file types"):
        documents(folder)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no .txt/.jsonl/.parquet files"):
        documents(tmp_path / "nothing")


def test_missing_file_and_missing_column_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        documents(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        documents("./no/such/folder")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(UserError, match="no column 'text' \\(columns: content\\); pass --text_column"):
        documents(tmp_path / "rows.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match="could not read"):
        documents(tmp_path / "broken.jsonl")
    # the same through a script: one line on stderr, non-zero exit, no traceback
    result = run_script("train_tokenizer.py", "--dataset_path_huggingface", str(tmp_path / "rows.jsonl"),
                        "--output_path", str(tmp_path / "tok"), timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "--text_column" in lines[0], result.stderr
    assert not (tmp_path / "tok").exists()


def test_rows_without_text_are_counted_and_reported(tmp_path, capsys) -> None:
    rows = [{"text": "kept one"}, {"text": None}, {"text": 7}, {"other": "no text column"}, {"text": ""},
            {"text": "kept two"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped: dict[str, int] = {}
    assert list(corpus.iter_documents(DatasetOptions(dataset_path_huggingface=str(path)), skipped)) == \
        ["kept one", "kept two"]
    assert skipped == {"null": 2, "int": 1}  # datasets reads a row without the column as null
    err = capsys.readouterr().err
    assert "skipped 3 of the 6 rows" in err and "1 whose 'text' is a number" in err and "null or missing" in err
    (tmp_path / "none.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in (1, None, 2.5)))
    with pytest.raises(UserError, match="every row .* was skipped"):
        documents(tmp_path / "none.jsonl")


def test_a_reader_stopped_early_still_reports(tmp_path, capsys) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", None, "b", "c")))
    reader = corpus.iter_documents(DatasetOptions(dataset_path_huggingface=str(path)))
    assert [next(reader), next(reader)] == ["a", "b"]
    reader.close()
    assert "skipped 1 of the 3 rows" in capsys.readouterr().err


def test_builtin_corpus_is_fixed_and_ordered() -> None:
    from pydoc_data.topics import topics

    docs = corpus.builtin_corpus_documents()
    assert docs is corpus.builtin_corpus_documents()  # assembled once
    assert list(docs[:len(topics)]) == [topics[name].strip() for name in sorted(topics)]
    assert len(docs) > 3000 and all(len(d) >= 40 for d in docs[len(topics):])
    assert documents("builtin")[:5] == list(docs[:5])
    assert corpus.describe_source(DatasetOptions()) .startswith("builtin corpus")
    assert corpus.describe_source(DatasetOptions(dataset_path_huggingface="org/name", dataset_sub_set="s")) == \
        "HF hub org/name [s] split=train"
