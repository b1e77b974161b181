#!/usr/bin/env python3
"""Checks the shape of the source tree: no import cycle between a crate's modules, and no
source file longer than FILE_LINES_MAX lines before its trailing `#[cfg(test)]` module.

Cycles: each crate's `src/` files are grouped by their top-level module (`net/src/cluster/leader.rs`
is in `cluster`); a reference `crate::peer::...` (in a `use` line or in code, before the file's
`#[cfg(test)]` module) is an edge from the file's group to `peer`. A cycle between two groups (cluster uses peer and peer uses
cluster) is reported with the lines that make it. Cargo already forbids cycles between crates.

Length: every tracked `.rs` file but generated ones (a first line that says `@generated`)
and the fuzz crate counts its lines up to the first `#[cfg(test)]` at the start of a line.
A file over the limit must be listed in tests/structure_allowlist.txt with a count it may not
exceed; the list only shrinks (a listed file now within the limit must be removed from it).

    python3 tests/check_structure.py        # exits 1 listing every problem
"""

import os
import re
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE_LINES_MAX = 800
ALLOWLIST = os.path.join(ROOT, "tests", "structure_allowlist.txt")
CRATE_REF = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def tracked_rust_files():
    out = subprocess.run(
        ["git", "ls-files", "*.rs"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    # Tracked files deleted in the work tree (a split under way) are not read.
    return [
        f
        for f in out.split()
        if not f.startswith("tests/fuzz/") and os.path.exists(os.path.join(ROOT, f))
    ]


def lines_before_tests(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and "@generated" in lines[0]:
        return None
    for i, line in enumerate(lines):
        if line.startswith("#[cfg(test)]"):
            return i
    return len(lines) - (1 if lines and lines[-1] == "" else 0)


def read_allowlist():
    allowed = {}
    if not os.path.exists(ALLOWLIST):
        return allowed
    with open(ALLOWLIST, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            count, path = line.split(None, 1)
            allowed[path] = int(count)
    return allowed


def check_lengths(files):
    problems = []
    allowed = read_allowlist()
    for path in files:
        n = lines_before_tests(path)
        if n is None:
            continue
        limit = allowed.pop(path, None)
        if n > FILE_LINES_MAX and limit is None:
            problems.append(f"{path}: {n} lines before its tests (at most {FILE_LINES_MAX}): split it")
        elif limit is not None and n > limit:
            problems.append(f"{path}: {n} lines, more than the {limit} tests/structure_allowlist.txt allows: split it before adding")
        elif limit is not None and n <= FILE_LINES_MAX:
            problems.append(f"{path}: {n} lines now: remove it from tests/structure_allowlist.txt")
    for path in allowed:
        problems.append(f"{path}: listed in tests/structure_allowlist.txt but not a tracked file")
    return problems


def module_group(path):
    """(crate dir, top-level module) of a file under some crate's src/, else None."""
    parts = path.split("/")
    if "src" not in parts:
        return None
    i = parts.index("src")
    crate, rest = "/".join(parts[:i]), parts[i + 1 :]
    if not rest or rest[0] in ("lib.rs", "main.rs") or rest[0] == "bin":
        return None
    return crate, rest[0][:-3] if rest[0].endswith(".rs") else rest[0]


def check_cycles(files):
    edges = defaultdict(lambda: defaultdict(list))  # crate -> (from, to) -> [where]
    for path in files:
        group = module_group(path)
        # A folder's unit tests in their own file (`tests.rs`, declared `#[cfg(test)] mod
        # tests;`) may use anything, as a trailing test module may.
        if group is None or path.endswith("/tests.rs"):
            continue
        crate, module = group
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.startswith("#[cfg(test)]"):
                    break  # a unit test module may use anything
                code = line.split("//", 1)[0]
                for target in CRATE_REF.findall(code):
                    if target != module:
                        edges[crate][(module, target)].append(f"{path}:{n}")
    problems = []
    for crate, pairs in sorted(edges.items()):
        graph = defaultdict(set)
        for a, b in pairs:
            graph[a].add(b)
        for cycle in strongly_connected(graph):
            where = [w for (a, b), ws in sorted(pairs.items()) if a in cycle and b in cycle for w in ws[:2]]
            problems.append(
                f"{crate or '.'}: modules {', '.join(sorted(cycle))} use each other (an import cycle): "
                + "; ".join(where)
            )
    return problems


def strongly_connected(graph):
    """Tarjan's algorithm; yields each component of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def main():
    files = tracked_rust_files()
    problems = check_cycles(files) + check_lengths(files)
    for p in problems:
        print(p)
    if problems:
        print(f"check_structure: {len(problems)} problem(s)")
        return 1
    print(f"check_structure: {len(files)} files, no import cycle, none over {FILE_LINES_MAX} lines before its tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
