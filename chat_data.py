"""Built-in instruction data for sft.py, derived deterministically from the built-in corpus (corpus.py): no download.

Two kinds of question, each answered by text that ships with Python:
  * every pydoc help topic:  "Explain the `with` statement"  ->  the topic's first paragraph
  * every public module-level function and class of the standard library (and public methods of public classes):
    "What does `os.path.join` do?"  ->  the first paragraph of its docstring

The split is by topic name (a hash of it), so a held-out question asks about a name never trained on; about 10%
of the names are held out (`split="test"`). The same Python gives the same data, in the same order.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig
from pathlib import Path

import corpus

SPLITS = ("train", "test")
HELD_OUT_PERCENT = 10
MAX_ANSWER_CHARS = 600
# modules better known under another name
MODULE_ALIASES = {"posixpath": "os.path", "genericpath": "os.path"}
FUNCTION_QUESTIONS = ("What does `{name}` do?", "What is `{name}` for?", "Describe `{name}`.",
                      "Explain what `{name}` does.")
CLASS_QUESTIONS = ("What is `{name}`?", "What is the `{name}` class for?", "Describe the class `{name}`.")


def split_of(name: str) -> str:
    """'test' for about HELD_OUT_PERCENT% of the names (by a hash of the name), 'train' for the rest."""
    bucket = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "test" if bucket < HELD_OUT_PERCENT else "train"


def _pick(templates: tuple[str, ...], name: str) -> str:
    return templates[int(hashlib.md5(name.encode("utf-8")).hexdigest()[:8], 16) % len(templates)]


def first_paragraph(text: str) -> str:
    """The first paragraph (up to a blank line), its lines joined by spaces, cut at a sentence end before
    MAX_ANSWER_CHARS."""
    paragraph = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    paragraph = " ".join(line.strip() for line in paragraph.splitlines())
    if len(paragraph) > MAX_ANSWER_CHARS:
        cut = paragraph.rfind(". ", 0, MAX_ANSWER_CHARS)
        paragraph = paragraph[:cut + 1] if cut > 0 else paragraph[:MAX_ANSWER_CHARS]
    return paragraph


def _topic_examples() -> list[tuple[str, str, str]]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        lines = topics[name].strip().splitlines()
        if len(lines) < 3 or not set(lines[1]) <= set("*="):  # a title underlined with * or =
            continue
        title = lines[0].strip().replace('"', "`")
        if not title[1:2].isupper():  # "The `with` statement" -> "the `with` statement"; acronyms stay
            title = title[0].lower() + title[1:]
        # the first paragraph of prose (grammar productions "a ::= b" are not an answer)
        paragraphs = [p for p in re.split(r"\n\s*\n", "\n".join(lines[2:])) if p.strip() and "::=" not in p]
        answer = first_paragraph(paragraphs[0]) if paragraphs else ""
        if len(answer) >= 40:
            out.append((name, f"Explain {title}.", answer))
    return out


def _module_name(path: Path, stdlib: Path) -> str | None:
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or any(p.startswith("_") for p in parts):
        return None
    name = ".".join(parts)
    return MODULE_ALIASES.get(name, name)


def _docstring_examples() -> list[tuple[str, str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for directory, subdirs, files in os.walk(stdlib):
        subdirs[:] = sorted(d for d in subdirs if d not in corpus._SKIPPED_STDLIB_DIRS)
        for file in sorted(files):
            path = Path(directory, file)
            module = _module_name(path, stdlib) if file.endswith(".py") else None
            if module is None:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            nodes = [(f"{module}.{node.name}", node) for node in tree.body if isinstance(node, definitions)]
            for qualname, node in list(nodes):
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    nodes += [(f"{qualname}.{child.name}", child) for child in node.body
                              if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for qualname, node in nodes:
                if node.name.startswith("_") or qualname in seen:
                    continue
                doc = ast.get_docstring(node)
                answer = first_paragraph(doc) if doc else ""
                if len(answer) < 20:
                    continue
                seen.add(qualname)
                kind = CLASS_QUESTIONS if isinstance(node, ast.ClassDef) else FUNCTION_QUESTIONS
                out.append((qualname, _pick(kind, qualname).format(name=qualname), answer))
    return out


@functools.lru_cache(maxsize=1)
def _all_examples() -> tuple[tuple[str, str, str], ...]:
    return tuple(_topic_examples() + _docstring_examples())


def builtin_conversations(split: str = "train") -> list[dict]:
    """The built-in instruction set: [{"name": ..., "messages": [user question, assistant answer]}, ...] of one
    split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [{"name": name, "messages": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}]}
            for name, question, answer in _all_examples() if split_of(name) == split]


if __name__ == "__main__":  # a peek at the data
    for split in SPLITS:
        rows = builtin_conversations(split)
        print(f"{split}: {len(rows)} conversations")
    for row in builtin_conversations("train")[:3] + builtin_conversations("train")[100:102]:
        print(row["messages"][0]["content"], "->", row["messages"][1]["content"][:120])
