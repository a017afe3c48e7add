"""The docs stay true to the repository: every business-rule id cited in the code or the docs has
a section in ``docs/rules.md``, and every repository path or relative link the docs name exists.

Pure file scans (no imports of the project): they read README.md, docs/*.md and the *.py and *.md
files of the repository's own packages and tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "rules.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The repository's own top-level folders: a backticked path that starts with one names a file here.
TOP = ("protocols", "drivers", "gateway", "ingest", "simulators", "tests", "docs", ".ci")
SOURCE_DIRS = ("protocols", "drivers", "gateway", "ingest", "simulators", "tests", "docs")

RULE_ID = re.compile(r"\b(?:VEE|KPI|TOU|FC|LL|OUT)-\d{2}\b")
HEADING = re.compile(r"^#{2,6} +((?:VEE|KPI|TOU|FC|LL|OUT)-\d{2})\s*$", re.MULTILINE)
ANCHOR = re.compile(r'<a id="([a-z]+-\d{2})"></a>')
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PATH_TOKEN = re.compile(r"^[\w.-]+(?:/[\w.-]+)+/?$")
LINK = re.compile(r"\]\(([^)\s]+)\)")
RULES_LINK = re.compile(r"docs/rules\.md#([\w-]+)|\(rules\.md#([\w-]+)\)|\(#([\w-]+)\)")


def _source_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in SOURCE_DIRS:
        files += sorted(p for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md") and p.is_file())
    return files


def rule_anchors(text: str) -> set[str]:
    """Anchors of the rule sections: a heading that is just the id (slug = the id, lower case),
    or an explicit ``<a id="...">`` (the rows of the "Not implemented" table)."""
    return {h.lower() for h in HEADING.findall(text)} | set(ANCHOR.findall(text))


def cited_rule_ids(files: list[Path]) -> dict[str, str]:
    """Every rule id cited, with one place that cites it."""
    cited: dict[str, str] = {}
    for path in files:
        if path == RULES:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for rule in RULE_ID.findall(line):
                cited.setdefault(rule, f"{path.relative_to(ROOT)}:{n}")
    return cited


def repository_paths(text: str) -> list[str]:
    """Backticked words that name a repository file or folder: ``ingest/rules/kernels.py``,
    ``docs/x.md``, ``tests/...``, also inside a command (``pytest tests/bench/x.py``).
    ``::test`` and ``#anchor`` suffixes are dropped; globs and placeholders are skipped."""
    found = []
    for span in CODE_SPAN.findall(text):
        for word in span.split():
            word = word.split("::")[0].split("#")[0].rstrip(".,;:")
            if PATH_TOKEN.match(word) and word.split("/")[0] in TOP:
                found.append(word)
    return found


def test_every_cited_rule_id_has_a_section_in_rules_md() -> None:
    anchors = rule_anchors(RULES.read_text(encoding="utf-8"))
    cited = cited_rule_ids(_source_files())
    assert cited, "the scan found no rule ids: the pattern or the file list is broken"
    missing = {rule: where for rule, where in cited.items() if rule.lower() not in anchors}
    assert not missing, f"rule ids cited without a section in docs/rules.md: {missing}"


def test_links_to_rules_md_anchors_resolve() -> None:
    anchors = rule_anchors(RULES.read_text(encoding="utf-8"))
    headings = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", RULES.read_text(encoding="utf-8"), re.MULTILINE)
    }
    bad = []
    for path in _source_files():
        text = path.read_text(encoding="utf-8")
        for m in RULES_LINK.finditer(text):
            if m.group(3) is not None and path != RULES:
                continue  # a same-page link of another page
            anchor = next(g for g in m.groups() if g is not None)
            if anchor not in anchors | headings:
                bad.append(f"{path.relative_to(ROOT)}: #{anchor}")
    assert not bad, f"links to missing docs/rules.md anchors: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_backticked_repository_paths_exist(doc: Path) -> None:
    missing = [p for p in repository_paths(doc.read_text(encoding="utf-8")) if not (ROOT / p).exists()]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_exist(doc: Path) -> None:
    missing = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


def test_the_scanners_see_what_they_must() -> None:
    """The scans themselves: a path in a command, a ``::test`` suffix, a glob and a topic; a rule
    heading, a table anchor and a title that is not a rule section."""
    text = "run `pytest tests/bench/x.py::t -s`, see `docs/a.md#b`, `protocols/maps/*.toml`, `ami/v1/x/y`"
    assert repository_paths(text) == ["tests/bench/x.py", "docs/a.md"]
    rules = '### VEE-01\n\n| <a id="fc-10"></a>FC-10 | x |\n### TOU-02 prices\n'
    assert rule_anchors(rules) == {"vee-01", "fc-10"}
