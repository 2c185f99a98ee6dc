"""The documentation holds together: every relative link and anchor in README.md, CONTRIBUTING.md and docs/*.md
resolves, every docs page is reachable from the front page, the front page stays short, every generated table sits in
its page, and the numbers the prose states are the results files' (a GPU rate, TFLOP/s, MFU or memory per image is
measured or says it is derived; the digits timings are the measured ones). Pure file parsing."""

from __future__ import annotations

import json
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
          "bands-bench": "docs/data.md",
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


# ----------------------------------------------------------------------------------- numbers the pages state
RESULTS = ROOT / "benchmarks" / "results"
_GENERATED = re.compile(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", re.S)
_FIGURE = re.compile(r"(?<![\w.,])(\d[\d,]*(?:\.\d+)?)\s*(img/s|TFLOP/s|% MFU|GB per image|GB/image)")
_SENTENCE_END = re.compile(r"(?<=[.!?;])(?<!e\.g\.)(?<!i\.e\.)(?<!vs\.)\s+")
_ITEM = re.compile(r"\n(?=\s*(?:[-*]|\d+\.)\s)")  # a list item starts a paragraph of its own
_MINUTES = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:min|minutes)\b")


def units(text: str) -> list[str]:
    """The hand-written prose of a page as units a claim lives in: each table row, each sentence of a paragraph
    (generated tables, fenced code and comments left out)."""
    prose = _prose(_GENERATED.sub("", text))
    out = []
    for block in (b for para in re.split(r"\n\s*\n", prose) for b in _ITEM.split(para)):
        lines = block.splitlines()
        out += [line for line in lines if line.lstrip().startswith("|")]
        para = " ".join(line.strip() for line in lines if not line.lstrip().startswith("|"))
        out += [s for s in _SENTENCE_END.split(para) if s]
    return out


def _numbers(obj, key: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON value with the key it sits under (a list's items under the list's key)."""
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in _numbers(v, str(k))]
    if isinstance(obj, list):
        return [n for v in obj for n in _numbers(v, key)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(key, float(obj))]
    return []


def measured_values(results: Path) -> dict[str, list[float]]:
    """What the results files measured, per unit: img/s, TFLOP/s, MFU in % (the file's own, and TFLOP/s over every
    GPU peak the tables use) and GB per image."""
    from fastmae.train.bench_report import MEASURED_PEAK_TFLOPS, PEAK_TFLOPS

    peaks = {v for v in (*PEAK_TFLOPS.values(), *MEASURED_PEAK_TFLOPS.values()) if v}
    found: dict[str, list[float]] = {"img/s": [], "TFLOP/s": [], "% MFU": [], "GB per image": []}
    for path in results.rglob("*.json"):
        try:
            numbers = _numbers(json.loads(path.read_text()))
        except ValueError:
            continue
        for key, value in numbers:
            if "img_per_s" in key or key in ("rates", "img_s"):
                found["img/s"].append(value)
            if "tflop" in key:
                found["TFLOP/s"].append(value)
                found["% MFU"] += [100 * value / p for p in peaks]
            if "mfu" in key:
                found["% MFU"].append(100 * value)
            if "per_image" in key and "flop" not in key:
                found["GB per image"].append(value)
    return found


def unsupported_figures(root: Path, results: Path) -> list[str]:
    """Every img/s, TFLOP/s, % MFU or GB-per-image figure in the hand-written prose of README.md, CONTRIBUTING.md and
    docs/ that no results file holds (to the figure's own precision), unless its sentence says it is derived (or, for
    a peak's TFLOP/s, that it is a peak the tables use)."""
    from fastmae.train.bench_report import MEASURED_PEAK_TFLOPS, PEAK_TFLOPS

    found = measured_values(results)
    peaks = {v for v in (*PEAK_TFLOPS.values(), *MEASURED_PEAK_TFLOPS.values()) if v}
    out = []
    for page in pages(root):
        for unit in units(page.read_text()):
            for number, kind in _FIGURE.findall(unit):
                kind = "GB per image" if kind == "GB/image" else kind
                value = float(number.replace(",", ""))
                tol = 0.5 * 10 ** -(len(number.split(".")[1]) if "." in number else 0) + 1e-9
                if any(abs(v - value) <= tol for v in found[kind]) or "derived" in unit.lower():
                    continue
                if kind == "TFLOP/s" and value in peaks and "peak" in unit.lower():
                    continue
                out.append(f"{page.relative_to(root)}: {number} {kind} is in no results file: {unit[:120]}")
    return out


def test_every_gpu_figure_is_measured_or_marked_derived():
    assert unsupported_figures(ROOT, RESULTS) == []


def test_a_figure_without_a_results_file_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text(json.dumps({"rows": [
        {"img_per_s": 2453.855, "tflops": 305.59, "mfu": 0.38682, "peak_mem_gb_per_image": 0.11320}]}))
    (tmp_path / "README.md").write_text(
        "# T\n\nIt ran 2454 img/s at 305.6 TFLOP/s, 30.9% MFU (38.7% MFU against the measured matmul peak), "
        "0.113 GB per image. The spec peak is 989.4 TFLOP/s.\n\n"
        "On an H100 it runs 3100 img/s. ViT-H runs about 1046 img/s (derived from ViT-L's FLOP rate).\n\n"
        "| a | b |\n| --- | --- |\n| x | 31.5% MFU |\n\n```\n999 img/s in a code block\n```\n\n"
        "<!-- t:start -->\n1234 img/s generated\n<!-- t:end -->\n")
    found = unsupported_figures(tmp_path, tmp_path / "results")
    assert [f.split(" is in no")[0] for f in found] == ["README.md: 3100 img/s", "README.md: 31.5 % MFU"], found


def digits_times(results: Path = RESULTS) -> dict[str, str]:
    """The digits flow's times (minutes) in the newest digits-payoff results: the pretraining, a finetune and a probe
    (means), and one seed of the front page's flow (pretrain, finetune twice, one probe), as the pages round them."""
    saved = json.loads(sorted(results.glob("digits-payoff-*.json"))[-1].read_text())

    def mean(kind: str) -> float:
        times = [r["minutes"] for r in saved["rows"] if r["kind"] == kind]
        return sum(times) / len(times)

    pre, fine, probe = saved["pretrain_minutes"], mean("finetune"), mean("linprobe")
    return {"pretrain": f"{pre:.1f}", "finetune": f"{fine:.1f}", "probe": f"{probe:.1f}",
            "flow": f"{round(pre + 2 * fine + probe)}"}  # fmt: skip


def test_digits_timings_are_the_measured_ones():
    """One measured number per digits timing, stated the same everywhere: the front page's flow, the pretraining
    page's pretraining and finetune, and no other minutes stated about the digits (nor in the preset's comment)."""
    times = digits_times()
    assert f"in about {times['flow']} minutes on a 2-core CPU" in " ".join((ROOT / "README.md").read_text().split())
    assert (f"The pretraining alone took {times['pretrain']} minutes on two cores, a finetune {times['finetune']} and "
            f"a linear probe {times['probe']}") in " ".join((ROOT / "docs" / "pretraining.md").read_text().split())
    stated = [(page.name, unit) for page in pages(ROOT) for unit in units(page.read_text()) if "digit" in unit.lower()]
    config = (ROOT / "fastmae" / "config.py").read_text()
    stated.append(("config.py", config[config.rindex("# MAE on small images") : config.index('"digits": Pretrain')]))
    wrong = [(name, n, unit[:100]) for name, unit in stated for n in _MINUTES.findall(unit) if n not in times.values()]
    assert wrong == []
