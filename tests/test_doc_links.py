"""Every relative link and image in the Markdown files resolves, and every repository path named in code exists.

Links: ``[text](target)``, ``![alt](target)``, reference definitions ``[label]: target`` and HTML ``href``/``src``
attributes, outside code. A target must be a file or folder of the checkout; a ``#fragment`` must be the id
GitHub gives a heading of the target (or an explicit ``id``/``name`` anchor). Web links are not fetched.
Paths in code (``digits_ray/...``, ``jobs/...``, ``cluster/...`` in backticks or fenced blocks) must exist too,
so a moved module shows up here with every doc that still names its old place.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {"node_modules", "__pycache__", "artifacts", "models", "runs"}  # not docs: ignored outputs

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_ATTR = re.compile(r"<[a-zA-Z][^>]*?\s(?:href|src)\s*=\s*[\"']([^\"']*)[\"']")
HTML_ANCHOR = re.compile(r"<[a-zA-Z][^>]*?\s(?:id|name)\s*=\s*[\"']([^\"']*)[\"']")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
REPO_PATH = re.compile(r"(?<![\w/.$~-])((?:digits_ray|jobs|cluster|bench|tests|docs)/[\w./-]*)")


def markdown_files(root: Path = ROOT) -> list[Path]:
    """The checkout's Markdown files: git's tracked and not-ignored ones, else every one outside hidden folders."""
    if shutil.which("git") and (root / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.md"],
                                cwd=root, capture_output=True, text=True)
        if listed.returncode == 0:
            return sorted(root / name for name in listed.stdout.split("\0") if name and (root / name).is_file())
    return sorted(p for p in root.rglob("*.md")
                  if not any(part.startswith(".") or part in SKIPPED_DIRS for part in p.relative_to(root).parts))


def outside_fences(text: str) -> list[str | None]:
    """The file's lines, None for those inside fenced code blocks (the fences included)."""
    lines: list[str | None] = []
    fence = None
    for line in text.splitlines():
        marker = FENCE.match(line)
        if fence is None and marker:
            fence = marker.group(1)
            lines.append(None)
        elif fence is not None:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence) \
                    and not line.strip()[len(marker.group(1)):]:
                fence = None
            lines.append(None)
        else:
            lines.append(line)
    return lines


def prose(path: Path) -> list[str]:
    """The lines outside fenced blocks, with code spans blanked out ("" for fenced lines)."""
    return ["" if line is None else CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
            for line in outside_fences(path.read_text(encoding="utf-8"))]


def code(path: Path) -> list[str]:
    """The code of a file: its fenced blocks' lines and its code spans."""
    text = path.read_text(encoding="utf-8")
    kept = outside_fences(text)
    found = [line for line, outside in zip(text.splitlines(), kept) if outside is None and not FENCE.match(line)]
    for line in kept:
        if line is not None:
            found += [m.group(2) for m in CODE_SPAN.finditer(line)]
    return found


def heading_text(markdown: str) -> str:
    """A heading's text as GitHub renders it: code kept verbatim, links and images as their text, no emphasis."""
    parts = []
    for i, piece in enumerate(re.split(r"(`+[^`]*`+)", markdown)):
        if i % 2:  # a code span
            parts.append(piece.strip("`"))
            continue
        piece = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", piece)
        piece = re.sub(r"<[^>]+>", "", piece)
        piece = re.sub(r"(?<![\w\\])[*_]+|[*_]+(?![\w])", "", piece)
        parts.append(piece)
    return "".join(parts)


def slug(text: str) -> str:
    """GitHub's heading id: lowercase; letters, digits, ``_``, ``-`` and spaces kept, spaces made ``-``."""
    return "".join(c for c in text.strip().lower() if c.isalnum() or c in "_- ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids a link can name in ``path``: its headings' slugs (repeats get ``-1``, ``-2``...) and explicit anchors."""
    lines = outside_fences(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        if line is None:
            continue
        heading = ATX_HEADING.match(line)
        text = heading.group(2) if heading else None
        above = lines[i - 1] if i else None
        if text is None and above and above.strip() and SETEXT_UNDERLINE.match(line) and not ATX_HEADING.match(above):
            text = above.strip()
        if text is not None:
            base = slug(heading_text(text))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(HTML_ANCHOR.findall(CODE_SPAN.sub("", line)))
    return found


def link_targets(path: Path) -> list[str]:
    """Every link or image target written in ``path``, outside code."""
    targets = []
    for line in prose(path):
        targets += [m.group(1).strip("<>") for m in INLINE_LINK.finditer(line)]
        targets += [m.group(1).strip("<>") for m in REFERENCE_DEF.finditer(line)]
        targets += HTML_ATTR.findall(line)
    return targets


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """``file: target (why)`` for each relative link or image that does not resolve."""
    broken = []
    for path in files:
        for target in link_targets(path):
            if not target or SCHEME.match(target) or target.startswith("//"):
                continue  # a web or mail link
            location, _, fragment = target.partition("#")
            location = unquote(location.split("?")[0])
            if location.startswith("/"):
                resolved = root / location.lstrip("/")
            else:
                resolved = (path.parent / location) if location else path
            where = f"{path.relative_to(root)}: {target}"
            shown = os.path.relpath(resolved, root)
            if not resolved.exists():
                broken.append(f"{where} (no such file: {shown})")
            elif fragment and resolved.suffix == ".md" and unquote(fragment).lower() not in anchors(resolved):
                broken.append(f"{where} (no heading #{fragment} in {shown})")
    return broken


def missing_paths(files: list[Path], root: Path = ROOT) -> list[str]:
    """``file: path`` for each repository path named in code (``digits_ray/x.py``, ``cluster/``) that does not exist."""
    missing = []
    for path in files:
        for line in code(path):
            for match in REPO_PATH.finditer(line):
                name = match.group(1).rstrip(".")
                following = line[match.end():match.end() + 1]
                if following in ("*", "<", "{", "[") or "..." in name:
                    continue  # a pattern or a placeholder, not a path
                if not (root / name).exists():
                    missing.append(f"{path.relative_to(root)}: {name}")
    return sorted(set(missing))


def test_the_docs_are_found():
    files = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "bench/README.md", "docs/contributing.md"} <= files, sorted(files)


def test_every_relative_link_resolves():
    broken = broken_links(markdown_files())
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_repository_path_named_in_code_exists():
    missing = missing_paths(markdown_files())
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize(("heading", "expected"), [
    ("Serving: `python bench/serve_load.py`", "serving-python-benchserve_loadpy"),
    ("A Ray cluster on one machine (`cluster/`)", "a-ray-cluster-on-one-machine-cluster"),
    ("Ray Train: multi-worker Keras with checkpoints, resume and fault tolerance",
     "ray-train-multi-worker-keras-with-checkpoints-resume-and-fault-tolerance"),
    ("The operator's day", "the-operators-day"),
    ("Explanations and \"not a digit\"", "explanations-and-not-a-digit"),
    ("**Bold** and [a link](x.md) and _emphasis_", "bold-and-a-link-and-emphasis"),
])
def test_heading_ids_follow_github(heading, expected):
    assert slug(heading_text(heading)) == expected


def test_the_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Two words\n\n## Two words\n\nSetext\n---\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#two-words) [ok](docs/page.md#two-words-1) [ok](docs/page.md#setext)\n"
        "[ok](#top) <a id=\"top\"></a> [web](https://example.com/missing) ![ok](docs/)\n"
        "`[not a link](nowhere.md)`\n\n```\n[not a link](nowhere.md)\n```\n"
        "[bad file](docs/nothere.md) ![bad image](docs/images/none.png) [bad anchor](docs/page.md#three-words)\n"
        "[bad local](#nowhere) <img src=\"docs/missing.png\">\n\n[ref]: docs/gone.md\n"
        "`docs/page.md` `docs/gone.py` `cluster/*.sh`\n")
    broken = broken_links(sorted(tmp_path.rglob("*.md")), tmp_path)
    assert [line.split(" (")[0] for line in broken] == [
        "README.md: docs/nothere.md", "README.md: docs/images/none.png", "README.md: docs/page.md#three-words",
        "README.md: #nowhere", "README.md: docs/missing.png", "README.md: docs/gone.md"]
    assert missing_paths(sorted(tmp_path.rglob("*.md")), tmp_path) == ["README.md: docs/gone.py"]
