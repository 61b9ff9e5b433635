"""Every document the project cites is in the repository, and every cited section exists.

Comments, docstrings and docs cite the project's own pages as `docs/<name>.md §N[.M]` (e.g. docs/method.md §2,
docs/models.md §7.1, docs/flux2.md §1.3, ranges such as docs/method.md §2-§5). This reads every file of the
repository (tracked, plus untracked ones git does not ignore) as text: no imports of the project, no torch.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

# Documents that live outside the repository (the design notes the code was written from): a reader cannot
# follow a citation of them. `reference.md` also catches `flux2-reference.md`.
OUTSIDE = re.compile(r"scfm-method\.md|reference\.md|kernels\.md|house-style\.md|landscape\.md|shared/docs")

# `docs/<name>.md`, then optionally its sections: `§N[.M]` items joined by `,` `-` `–` or `and`, a line break
# (with a comment's `#`) allowed in between, as a wrapped docstring or comment has it.
_SEP = r"(?:\s*(?:,|-|–|\band\b)\s*|\s+)(?:#\s*)?"
CITATION = re.compile(r"docs/([\w.-]+?)\.md((?:" + _SEP + r"§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
RANGE = re.compile(r"§(\d+)\s*[-–]\s*§(\d+)(?![.\d])")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)

BINARY = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".safetensors", ".pt", ".bin", ".gz", ".zip", ".model", ".npz"}


@lru_cache(maxsize=1)
def repo_files() -> tuple[Path, ...]:
    """Tracked files and untracked, non-ignored ones (`git ls-files -co --exclude-standard`); without git,
    every file outside hidden and cache folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                             capture_output=True, timeout=30).stdout.decode()
        names = sorted({n for n in out.split("\0") if n})
        paths = [ROOT / n for n in names]
    except (OSError, subprocess.SubprocessError):
        paths = [p for p in sorted(ROOT.rglob("*"))
                 if not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(ROOT).parts)]
    return tuple(p for p in paths if p.is_file() and not p.is_symlink() and p.suffix.lower() not in BINARY)


@lru_cache(maxsize=None)
def text(path: Path) -> str:
    data = path.read_bytes()
    return "" if b"\0" in data else data.decode("utf-8", errors="replace")


@lru_cache(maxsize=None)
def headings(name: str) -> frozenset[str] | None:
    """Section numbers of docs/<name>.md (`## 2. Title` -> "2", `### 7.1 Title` -> "7.1"); None if no such file."""
    path = ROOT / "docs" / f"{name}.md"
    if not path.is_file():
        return None
    return frozenset(HEADING.findall(path.read_text(encoding="utf-8")))


def line_of(source: str, offset: int) -> int:
    return source.count("\n", 0, offset) + 1


def test_no_citation_of_documents_outside_the_repository():
    bad = []
    for path in repo_files():
        if path.resolve() == THIS:
            continue
        source = text(path)
        for m in OUTSIDE.finditer(source):
            start = source.rfind("\n", 0, m.start()) + 1
            end = source.find("\n", m.end())
            line = source[start:end if end >= 0 else None].strip()
            bad.append(f"{path.relative_to(ROOT)}:{line_of(source, m.start())}: {line[:140]}")
    assert not bad, "cites a document that is not in the repository (use docs/*.md):\n" + "\n".join(bad)


def test_every_docs_citation_resolves():
    bad = []
    for path in repo_files():
        source = text(path)
        if "docs/" not in source:
            continue
        for m in CITATION.finditer(source):
            name, sections = m.group(1), m.group(2)
            where = f"{path.relative_to(ROOT)}:{line_of(source, m.start())}: {m.group(0)!r}"
            found = headings(name)
            if found is None:
                bad.append(f"{where}: no file docs/{name}.md")
                continue
            wanted = set(SECTION.findall(sections))
            for lo, hi in RANGE.findall(sections):
                wanted.update(str(n) for n in range(int(lo), int(hi) + 1))
            bad.extend(f"{where}: docs/{name}.md has no section {n}" for n in sorted(wanted - found))
    assert not bad, "unresolved citations:\n" + "\n".join(bad)


def test_the_patterns_read_citations_as_written():
    one = "see docs/models.md §2-§4, §7.1 and\n    # §10 rows 3, 4; docs/flux2.md; docs/method.md §9 row 2"
    found = [(m.group(1), SECTION.findall(m.group(2)), RANGE.findall(m.group(2))) for m in CITATION.finditer(one)]
    assert found == [("models", ["2", "4", "7.1", "10"], [("2", "4")]), ("flux2", [], []), ("method", ["9"], [])]
    assert HEADING.findall("## 2. The sampler\n### 7.1 PEFT\n#### 1.2.3. deep\ntext ## 4. no\n") == ["2", "7.1",
                                                                                                      "1.2.3"]
    assert OUTSIDE.search("docs/models.md §2.4") is None
