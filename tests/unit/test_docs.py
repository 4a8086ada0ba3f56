"""The documents hold together: the README stays a short entry point, and every relative link in
README.md and docs/*.md points to a file that exists (and, for a #fragment into a Markdown file,
to a heading that exists there, as GitHub names its anchors)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 8 * 1024

# [text](target) outside code; a target has no spaces (titles are not used here).
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text):
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(path):
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def anchors(path):
    """GitHub's anchor of each heading: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen, out = {}, set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES} (details go to docs/)"


def test_the_documents_are_found():
    names = {p.name for p in DOCS}
    assert {"README.md", "api.md", "cli.md", "operations.md", "security.md", "design.md",
            "guest-contract.md", "performance.md"} <= names


def test_readme_links_every_document():
    targets = {t.split("#")[0] for t in links(ROOT / "README.md")}
    for doc in DOCS[1:]:
        assert f"docs/{doc.name}" in targets, f"README.md does not link docs/{doc.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)
