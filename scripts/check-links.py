#!/usr/bin/env python3
"""Fails on a relative link in README.md or docs/src that names a file or an anchor that does not
exist (mdBook itself fails only on a missing chapter or include). Anchors are headings, made into
ids the way mdBook and GitHub do: lower case, letters, digits, '-' and '_' kept, spaces to '-'."""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
REF = re.compile(r"^\[[^\]]+\]:\s*(\S+)", re.M)


def prose(text):
    """The text outside fenced code blocks and inline code."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def anchors(path):
    ids = set()
    for line in prose(path.read_text()).split("\n"):
        m = re.match(r"^#+\s+(.*)$", line)
        if m:
            title = m.group(1).strip().lower()
            ids.add(re.sub(r"[^a-z0-9_\- ]", "", title).replace(" ", "-"))
    return ids


def main():
    files = [ROOT / "README.md"] + sorted((ROOT / "docs" / "src").glob("*.md"))
    bad = []
    for f in files:
        text = prose(f.read_text())
        for target in LINK.findall(text) + REF.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("mailto:"):
                continue
            name, _, anchor = target.partition("#")
            dest = f if name == "" else (f.parent / name)
            if not dest.exists():
                bad.append(f"{f.relative_to(ROOT)}: link to {target}: no such file")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{f.relative_to(ROOT)}: link to {target}: no such heading")
    for b in bad:
        print(b, file=sys.stderr)
    if bad:
        sys.exit(1)
    print(f"links: {len(files)} files checked")


main()
