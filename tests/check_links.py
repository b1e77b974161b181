#!/usr/bin/env python3
"""Checks every relative link in README.md and docs/*.md.

A link's target must exist (a file or a folder, relative to the file the link is in), and a
`#fragment` must name a heading of the target markdown file (or of the same file, for a bare
`#fragment`), by GitHub's rule for heading anchors: lower case, punctuation and symbols
dropped except `-` and `_`, each space a `-`, and `-1`, `-2`, ... after repeated headings.
Links with a scheme (`https:`, `mailto:`) are not checked. Code blocks and code spans are
skipped. Exits 1 listing each broken link as FILE:LINE: TARGET: REASON, 0 when all resolve.

    python3 tests/check_links.py            # from anywhere in the checkout
    python3 tests/check_links.py FILE.md    # only these files
"""

import os
import re
import sys
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
# [text](target) and ![alt](target); the target may be <...> and may carry a "title".
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def code_spans_removed(line):
    """The line with every `code span` blanked out (so links inside code are not seen)."""
    out, i = [], 0
    while i < len(line):
        if line[i] == "`":
            n = len(line[i:]) - len(line[i:].lstrip("`"))
            ticks = line[i : i + n]
            end = line.find(ticks, i + n)
            while end != -1 and end + n < len(line) and line[end + n] == "`":
                end = line.find(ticks, end + n + 1)
            if end == -1:
                out.append(line[i : i + n])
                i += n
                continue
            out.append(" " * (end + n - i))
            i = end + n
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def lines_outside_code(text):
    """(line number, line) for each line not inside a fenced code block."""
    fence = None
    for number, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield number, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):].strip():
            fence = None


def heading_text(raw):
    """A heading's text as rendered: links to their text, code spans and emphasis unwrapped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "")
    text = re.sub(r"(\*\*|__|\*|(?<!\w)_|_(?!\w)|~~)", "", text)
    return text.strip()


def slug(text):
    kept = []
    for ch in text.lower():
        if ch in "-_ " or ch.isalnum() or unicodedata.category(ch).startswith("M"):
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path, cache={}):
    """Every anchor GitHub makes for the markdown file at path."""
    if path in cache:
        return cache[path]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found, seen = set(), {}
    previous = None
    for _, line in lines_outside_code(text):
        title = None
        m = HEADING.match(line)
        if m:
            title = m.group(2)
        elif previous is not None and previous.strip() and SETEXT.match(line) and not HEADING.match(previous):
            title = previous.strip()
        for a in HTML_ANCHOR.findall(line):
            found.add(a)
        previous = line
        if title is None:
            continue
        base = slug(heading_text(title))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
        previous = None
    cache[path] = found
    return found


def links(text):
    """(line number, target) for each link outside code."""
    for number, line in lines_outside_code(text):
        line = code_spans_removed(line)
        m = REFERENCE.match(line)
        if m:
            yield number, m.group(1)
            continue
        for m in INLINE.finditer(line):
            yield number, m.group(1)


def check(path):
    problems = []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    here = os.path.dirname(path)
    for number, target in links(text):
        if target.startswith("<") and target.endswith(">"):
            target = target[1:-1]
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        where, _, fragment = target.partition("#")
        where = re.sub(r"%20", " ", where)
        resolved = os.path.normpath(os.path.join(here, where)) if where else path
        shown = f"{os.path.relpath(path, ROOT)}:{number}: {target}"
        if not resolved.startswith(ROOT + os.sep) and resolved != ROOT:
            problems.append(f"{shown}: leaves the repository")
            continue
        if not os.path.exists(resolved):
            problems.append(f"{shown}: {os.path.relpath(resolved, ROOT)} does not exist")
            continue
        if fragment:
            if os.path.isdir(resolved) or not resolved.endswith(".md"):
                problems.append(f"{shown}: #{fragment} needs a markdown file, {os.path.relpath(resolved, ROOT)} is not one")
            elif fragment not in anchors(resolved):
                problems.append(f"{shown}: no heading #{fragment} in {os.path.relpath(resolved, ROOT)}")
    return problems


def main(argv):
    if argv:
        files = [os.path.abspath(a) for a in argv]
    else:
        files = [os.path.join(ROOT, "README.md")]
        docs = os.path.join(ROOT, "docs")
        if os.path.isdir(docs):
            files += sorted(os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md"))
    problems = []
    for path in files:
        if not os.path.exists(path):
            problems.append(f"{os.path.relpath(path, ROOT)}: no such file")
            continue
        problems += check(path)
    for p in problems:
        print(p)
    if problems:
        print(f"check_links: {len(problems)} broken link(s) in {len(files)} file(s)", file=sys.stderr)
        return 1
    print(f"check_links: every relative link in {len(files)} file(s) resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
