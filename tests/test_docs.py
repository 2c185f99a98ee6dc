"""The documentation holds together: every relative link and anchor in README.md, CONTRIBUTING.md and docs/*.md
resolves, every docs page is reachable from the front page, and the front page stays short. Pure file parsing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRONT_PAGE_LINES = 260

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)  # fenced code blocks
_CODE = re.compile(r"`[^`]*`")  # inline code spans (may cross a line break)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def pages(root: Path) -> list[Path]:
    """The pages whose links are checked: the front page, CONTRIBUTING.md and every docs/*.md."""
    return [p for p in [root / "README.md", root / "CONTRIBUTING.md", *sorted((root / "docs").glob("*.md"))]
            if p.is_file()]  # fmt: skip


def _prose(text: str) -> str:
    """The text without fenced code, inline code (left as a word, so a link's text may hold code) or comments."""
    return _CODE.sub("code", _FENCE.sub("", _COMMENT.sub("", text)))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (links and code as their text), lowercased, punctuation other than
    ``-`` and ``_`` dropped, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page has; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, heading in _HEADING.findall(_FENCE.sub("", _COMMENT.sub("", path.read_text()))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The relative link targets of a page (web addresses left out)."""
    return [t for t in _LINK.findall(_prose(path.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def problems(root: Path) -> list[str]:
    """One line per link that does not resolve: a missing file, or an anchor the target does not have."""
    out = []
    for page in pages(root):
        for target in links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            name = f"{page.relative_to(root)}: ({target})"
            if not dest.exists():
                out.append(f"{name}: {file} does not exist")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                out.append(f"{name}: {dest.name} has no heading with anchor #{anchor}")
    return out


def test_every_link_and_anchor_resolves():
    assert problems(ROOT) == []


def test_every_docs_page_is_linked_from_the_front_page():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme) if t.partition("#")[0]}
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs and [p.name for p in docs if p.resolve() not in linked] == []
    assert (ROOT / "CONTRIBUTING.md").resolve() in linked


# Where each generated table lives (the page its generator's documented --readme names; CONTRIBUTING.md lists them)
TABLES = {"digits-payoff": "README.md", "index-bench": "docs/data.md", "loader-bench": "docs/data.md",
          "e2e-bench": "docs/data.md", "restarts-bench": "docs/long-runs.md", "fastmae-bench-gpu": "docs/benchmarks.md",
          "fastmae-breakdown": "docs/benchmarks.md", "fastmae-bench": "docs/benchmarks.md",
          "compile-bench": "docs/benchmarks.md", "startup-bench": "docs/benchmarks.md",
          "gpu-plan": "docs/pretraining.md", "checkpoint-bench": "docs/long-runs.md"}  # fmt: skip


def test_each_generated_table_sits_once_in_its_page():
    for page in pages(ROOT):
        text = _CODE.sub("", _FENCE.sub("", page.read_text()))  # markers named in code are not markers
        for name in re.findall(r"<!-- ([\w-]+):start -->", text):
            assert TABLES.get(name) == page.relative_to(ROOT).as_posix(), (name, page.name)
    for name, page in TABLES.items():
        text = (ROOT / page).read_text()
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), name
        assert f"`{name}`" in (ROOT / "CONTRIBUTING.md").read_text(), name  # listed with its page and command


def test_front_page_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= FRONT_PAGE_LINES


def test_slugs_follow_github():
    assert slug("What a run leaves in `--output-dir`") == "what-a-run-leaves-in---output-dir"
    assert slug("`fastmae bench`: the pretraining step, side by side") == (
        "fastmae-bench-the-pretraining-step-side-by-side")
    assert slug("Hugging Face transformers: folders in and out, continued pretraining") == (
        "hugging-face-transformers-folders-in-and-out-continued-pretraining")
    assert slug("Data (see [the index](x.md)), 1.28M files") == "data-see-the-index-128m-files"


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Same\n\n## Same\n\n```\n## Not a heading\n```\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#title) [dup](docs/a.md#same-1) ![img](docs/a.md) [self](#front) [web](https://x.org/#y)\n"
        "`[code](nowhere.md)`\n\n# Front\n\n[bad anchor](docs/a.md#nope) [fenced](docs/a.md#not-a-heading)\n"
        "[missing](docs/b.md) [third](docs/a.md#same-2) [split\nacross lines](docs/a.md#gone)\n")
    found = problems(tmp_path)
    assert [f.split(": (")[1].split(")")[0] for f in found] == [
        "docs/a.md#nope", "docs/a.md#not-a-heading", "docs/b.md", "docs/a.md#same-2", "docs/a.md#gone"]
    assert "a.md has no heading with anchor #nope" in found[0] and "docs/b.md does not exist" in found[2]
