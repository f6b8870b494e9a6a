"""The documentation holds together: README.md is a short entry whose links all lead somewhere.

README.md keeps what the project is, the quick start, a one-line map of every command and an
index of the pages under ``docs/``; each capability has its own page there. These tests check
that every relative link in the project's Markdown resolves to a file and every ``#anchor`` to a
heading (GitHub's slug rule), that README.md stays short and lists every page and every command
that ``cli.py`` registers.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 12_500

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
# [text](target) or ![alt](target), with an optional "title"; the text may hold `code`.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def markdown_files() -> list[Path]:
    """The Markdown files whose links are checked: README.md, docs/*.md, BENCHMARKS.md, docker/README.md."""
    files = [README, ROOT / "BENCHMARKS.md", ROOT / "docker" / "README.md", *sorted(DOCS.glob("*.md"))]
    return [f for f in files if f.exists()]


def without_code_blocks(text: str) -> str:
    """``text`` with fenced code blocks removed (a ``#`` there is a shell comment, not a heading)."""
    return FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text.

    GitHub renders the heading, takes its text, lowercases it, drops every character that is not
    a letter, digit, underscore, hyphen or space, and turns spaces into hyphens (github/cmark-gfm's
    anchor filter, as html-pipeline's TableOfContentsFilter spells it). Markdown syntax is
    rendered first: link targets and emphasis/code marks do not reach the slug.

    >>> github_slug("Definitions used by `analyze`")
    'definitions-used-by-analyze'
    >>> github_slug("Crop agreement: the exact crop (issue #23, session 6)")
    'crop-agreement-the-exact-crop-issue-23-session-6'
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text, not its target
    text = re.sub(r"[*`]", "", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(without_code_blocks(path.read_text(encoding="utf-8"))):
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks."""
    return LINK.findall(without_code_blocks(path.read_text(encoding="utf-8")))


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of ``path`` that names no existing file or folder, or no heading of its target.

    Links with a scheme (``https:``, ``mailto:``) are not followed; an anchor is checked only in a
    Markdown target. Paths in the messages are relative to ``root``.
    """
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: link ({target})"
        if not dest.exists():
            problems.append(f"{where}: no file {file_part}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


def section(text: str, title: str) -> str:
    """The body of the level-2 section ``## title`` (up to the next level-2 heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def registered_commands() -> set[str]:
    """Every command cli.py registers, a subgroup's as 'group command' (e.g. 'nnunet train'); a group
    that runs itself without a subcommand (``review``) is a command too."""
    import click

    import cli

    def walk(group: click.Group, prefix: str) -> set[str]:
        names = set()
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                names |= walk(command, f"{prefix}{name} ")
                if command.invoke_without_command:
                    names.add(prefix + name)
            else:
                names.add(prefix + name)
        return names

    return walk(cli.main, "")


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_checked_files_have_links():
    """The link check reads links at all (a regex that found none would pass every file)."""
    readme_links = links(README)
    assert "docs/cohort.md" in readme_links and "docs/followup.md" in readme_links
    assert any("#" in t for p in DOCS.glob("*.md") for t in links(p))


def test_a_broken_link_or_anchor_is_found(tmp_path):
    """The check fails on a missing file and on a missing heading, and passes the good ones."""
    (tmp_path / "b.md").write_text("# Title\n\n## Crop agreement: the exact crop (issue #23)\n\n## Again\n\n## Again\n",
                                   encoding="utf-8")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md) [ok](b.md#again-1) [ok](b.md#crop-agreement-the-exact-crop-issue-23) "
                    "[ok](#local) [web](https://example.org/x.md)\n\n## Local\n\n"
                    "[bad](c.md) [bad](b.md#again-2) [bad](#nowhere)\n\n```\n[not a link](nowhere.md)\n# not a heading\n```\n",
                    encoding="utf-8")
    assert broken_links(page, root=tmp_path) == [
        "a.md: link (c.md): no file c.md",
        "a.md: link (b.md#again-2): no heading with anchor #again-2 in b.md",
        "a.md: link (#nowhere): no heading with anchor #nowhere in a.md",
    ]


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move detail into a page under docs/"


def test_quick_start_is_make_demo_and_make_test():
    block = re.search(r"```[^\n]*\n(.*?)```", section(README.read_text(encoding="utf-8"), "Quick start"), re.DOTALL)
    assert block, "README.md's Quick start has no code block"
    assert block.group(1).split("\n")[:-1] == ["make demo", "make test"]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no page"
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_every_docs_page_starts_with_a_title_and_a_link_back():
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), f"{page.name}: the first line is not a '# ' title"
        assert "(../README.md)" in "\n".join(lines[1:4]), f"{page.name}: no link back to ../README.md under the title"


def test_the_command_map_lists_every_registered_command():
    """README.md's command map has one row per command cli.py registers, no more, no fewer."""
    body = section(README.read_text(encoding="utf-8"), "Commands")
    mapped = re.findall(r"^\| `([a-z][a-z -]*)` \|", body, re.MULTILINE)
    assert len(mapped) == len(set(mapped)), "a command appears twice in README.md's command map"
    registered = registered_commands()
    assert {"phantom", "nnunet train", "nnunet predict"} <= registered
    assert set(mapped) == registered


def test_the_command_reference_shows_every_command():
    text = (DOCS / "commands.md").read_text(encoding="utf-8")
    assert [c for c in sorted(registered_commands()) if f"python cli.py {c} " not in text] == []
