"""chat_data.py: the built-in instruction set is deterministic, split by name, and answers questions with the text
Python itself gives (inspect.getdoc / pydoc topics as the independent reference)."""
from __future__ import annotations

import inspect
import os.path

import chat_data


def test_examples_answer_with_pythons_own_documentation():
    rows = {row["name"]: row for split in chat_data.SPLITS for row in chat_data.builtin_conversations(split)}
    join = rows["os.path.join"]["messages"]
    assert join[0] == {"role": "user", "content": chat_data._pick(chat_data.FUNCTION_QUESTIONS, "os.path.join")
                       .format(name="os.path.join")}
    expected = " ".join(inspect.getdoc(os.path.join).split("\n\n")[0].split())
    assert " ".join(join[1]["content"].split()) == expected
    with_stmt = rows["with"]["messages"]
    assert with_stmt[0]["content"] == "Explain the `with` statement."
    assert with_stmt[1]["content"].startswith('The "with" statement is used to wrap the execution of a block')
    assert all(len(row["messages"][1]["content"]) <= chat_data.MAX_ANSWER_CHARS for row in rows.values())


def test_split_is_by_name_deterministic_and_held_out():
    train, test = chat_data.builtin_conversations("train"), chat_data.builtin_conversations("test")
    assert len(train) > 1000 and 0.05 < len(test) / (len(train) + len(test)) < 0.15
    train_names, test_names = {r["name"] for r in train}, {r["name"] for r in test}
    assert not train_names & test_names and len(train_names) == len(train)
    assert all(chat_data.split_of(name) == "test" for name in test_names)
    chat_data._all_examples.cache_clear()
    assert chat_data.builtin_conversations("test") == test  # rebuilt from scratch: the same data, same order
