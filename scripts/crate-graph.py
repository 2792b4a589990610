#!/usr/bin/env python3
"""The workspace's crate graph from `cargo metadata`: each member and the members it depends
on (normal dependencies; `(optional)` where a feature turns it on). docs/ARCHITECTURE.md
carries it between `<!-- crate-graph -->` and `<!-- /crate-graph -->`.

    scripts/crate-graph.py            print the block
    scripts/crate-graph.py --write    put it into docs/ARCHITECTURE.md
    scripts/crate-graph.py --check    fail (exit 1) when the document's block is stale
"""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
BEGIN, END = "<!-- crate-graph -->", "<!-- /crate-graph -->"


def graph() -> str:
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
    )
    members = {p["name"]: p for p in meta["packages"]}
    lines = ["```"]
    width = max(len(n) for n in members)
    for name in sorted(members):
        p = members[name]
        folder = pathlib.Path(p["manifest_path"]).parent.relative_to(ROOT).as_posix()
        deps = sorted(
            d["name"] + (" (optional)" if d.get("optional") else "")
            for d in p["dependencies"]
            if d["name"] in members and d.get("kind") is None
        )
        lines.append(f"{name:<{width}}  {folder + '/':<10} -> {', '.join(deps) or '(none)'}")
    lines.append("```")
    return "\n".join(lines)


def main() -> int:
    block = graph()
    if len(sys.argv) == 1:
        print(block)
        return 0
    text = DOC.read_text()
    try:
        head, rest = text.split(BEGIN + "\n", 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        print(f"{DOC}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    new = f"{head}{BEGIN}\n{block}\n{END}{tail}"
    if sys.argv[1] == "--write":
        DOC.write_text(new)
        return 0
    if sys.argv[1] == "--check":
        if new != text:
            print(f"{DOC}: the crate graph is stale; run scripts/crate-graph.py --write",
                  file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
