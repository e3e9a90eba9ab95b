"""The repository speaks of the product: no text about how it was developed.

Code, comments, docs, tests, studies and benchmark results describe what kdsweep does and what
was measured, never who worked on it when. History belongs in git and in CHANGELOG.md.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLACES = ["README.md", "CHANGELOG.md", "docs", "kdsweep", "tests", "studies", "benchmarks"]
# Spelled in pieces so that this file does not contain the phrases it looks for.
WORDS = re.compile("|".join(["this" + r"\s+" + "session", "issue" + r"\s+[0-9]", "this" + r"\s+" + "round",
                             "closing" + r"\s+" + "note"]), re.I)
TEXT = {".py", ".md", ".txt", ".json", ".sh", ".toml", ".yml", ".yaml", ".ini", ".cfg", ""}


def files() -> list[Path]:
    out = []
    for place in PLACES:
        path = ROOT / place
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out += [p for p in candidates if p.suffix in TEXT and "__pycache__" not in p.parts]
    return out


def test_no_development_talk_in_the_product():
    found = []
    for path in files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if WORDS.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "development talk:\n" + "\n".join(found)


def test_the_check_finds_the_phrases_it_names():
    examples = ("Measured this " + "Session.", "see issue" + " 12", "as this " + "round showed",
                "the Closing " + "note")
    for text in examples:
        assert WORDS.search(text), text
    assert not WORDS.search("a session fixture; issues of Optuna; a round number; a note")
