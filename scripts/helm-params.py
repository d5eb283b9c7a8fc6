#!/usr/bin/env python3
"""The chart's parameters table, from values.yaml: every leaf key, its default and the comment
above it (the comment of its section when it has none). Writes helm/optout-service/README.md
between its markers; with --check, fails if the file is not what it would write (scripts/helm-check.sh
runs that, so the table never drifts from the values)."""
import json, pathlib, re, sys

chart = pathlib.Path(__file__).resolve().parent.parent / "helm" / "optout-service"
values = (chart / "values.yaml").read_text().splitlines()
readme = chart / "README.md"
BEGIN, END = "<!-- parameters: begin (scripts/helm-params.py) -->", "<!-- parameters: end -->"

rows, path, comment = [], [], []  # path: [(indent, key, comment)]
# Keys written together under one comment share it: the key before, at the same indent, with no
# blank line between.
prev = None  # (indent, description)
for line in values:
    stripped = line.strip()
    if not stripped:
        comment, prev = [], None
        continue
    if stripped.startswith("#"):
        comment.append(stripped.lstrip("#").strip())
        continue
    m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):\s*(.*?)\s*$", line)
    if not m:
        continue  # a list item or a continuation: part of the value above
    indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
    while path and path[-1][0] >= indent:
        path.pop()
    own = " ".join(comment)
    comment = []
    if not own and prev and prev[0] == indent:
        own = prev[1]
    inherited = next((c for _, _, c in reversed(path) if c), "")
    path.append((indent, key, own))
    prev = (indent, own)
    if rest == "" :
        continue  # a section: its children are the rows
    value = rest.split(" #", 1)[0].strip()
    name = ".".join(k for _, k, _ in path)
    rows.append((name, value, own or inherited))

def cell(s):
    return s.replace("|", "\\|")

table = ["| Parameter | Default | Description |", "|---|---|---|"]
table += [f"| `{n}` | `{cell(v)}` | {cell(d)} |" for n, v, d in rows]
body = "\n".join([BEGIN, *table, END])

intro = """# optout-service Helm chart

The online NHS opt-out check service (RELEASE or WITHHOLD for each NHS number over gRPC), in front
of a shared Redis consent store. The book's "Operations" chapter says how to install it, which
Secrets to make first, and what the alerts mean ("Runbooks").

## Parameters

Generated from `values.yaml` by `scripts/helm-params.py`; `scripts/helm-check.sh` fails when it
is out of date. `values.schema.json` refuses a misspelt key, including under `config`.

"""
current = readme.read_text() if readme.exists() else ""
if BEGIN in current and END in current:
    wanted = current[: current.index(BEGIN)] + body + current[current.index(END) + len(END):]
else:
    wanted = intro + body + "\n"
if "--check" in sys.argv:
    if current != wanted:
        sys.exit("helm/optout-service/README.md: the parameters table is out of date with values.yaml; run python3 scripts/helm-params.py")
    print(f"  parameters table: {len(rows)} parameters, up to date")
else:
    readme.write_text(wanted)
    print(f"wrote {readme} ({len(rows)} parameters)")
