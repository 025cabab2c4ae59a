"""Count the lines a reader must read to follow a method file end to end.

That is the method file plus every top-level definition of common.py it reaches: the names it
uses as `common.X`, then the common.py names those definitions use, and so on. A "jump" is a
move from one common.py definition to the next in the order the method file first uses them;
a backward jump sends the reader up the file.

    python -m scripts.reading_path              # jjepa.py
    python -m scripts.reading_path mpm.py --common common.py --list
"""

import argparse
import ast
from pathlib import Path


def top_level_spans(tree):
    """{name: (first line, last line)} of every top-level def, class and assignment."""
    spans = {}
    for node in tree.body:
        # decorators sit above the def and are part of what a reader reads
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            spans[node.name] = (first, node.end_lineno, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        spans[name.id] = (first, node.end_lineno, node)
    return spans


def common_uses(tree, module="common"):
    """Names used as `module.X` (or imported from it), in reading order, each once."""
    hits = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == module):
            hits.append((node.lineno, node.col_offset, node.attr))
        elif isinstance(node, ast.ImportFrom) and node.module == module:
            hits += [(node.lineno, node.col_offset, alias.name) for alias in node.names]
    seen = {}
    for _, _, name in sorted(hits):
        seen.setdefault(name, None)
    return list(seen)


def reached(direct, spans):
    """The common.py definitions reached from `direct`, following names transitively."""
    todo = [name for name in direct if name in spans]
    done = set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        for node in ast.walk(spans[name][2]):
            if isinstance(node, ast.Name) and node.id in spans and node.id not in done:
                todo.append(node.id)
    return done


def count(method, common="common.py"):
    method_text = Path(method).read_text()
    spans = top_level_spans(ast.parse(Path(common).read_text()))
    direct = [name for name in common_uses(ast.parse(method_text)) if name in spans]
    names = reached(direct, spans)
    # one statement can define several names (a, b = ...): count its lines once
    statements = {spans[name][:2] for name in names}
    common_lines = sum(last - first + 1 for first, last in statements)
    starts = [spans[name][0] for name in direct]
    jumps = list(zip(starts, starts[1:]))
    # a reader of a method stops at common.py's internals line, where it has one
    marker = next((i for i, line in enumerate(Path(common).read_text().splitlines(), 1)
                   if line.startswith("# === internals")), None)
    above = sum(min(last, marker) - first + 1 for first, last in statements
                if marker is not None and first < marker)
    return {
        "method_lines": len(method_text.splitlines()),
        "common_lines": common_lines,
        "total_lines": len(method_text.splitlines()) + common_lines,
        "direct_names": len(direct),
        "definitions": len(statements),
        "jumps": len(jumps),
        "backward_jumps": sum(b < a for a, b in jumps),
        "path": starts,
        "common_lines_above_internals": above if marker is not None else None,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", nargs="?", default="jjepa.py", help="method file to follow")
    parser.add_argument("--common", default="common.py", help="the shared module")
    parser.add_argument("--list", action="store_true", help="also print the path of line numbers")
    args = parser.parse_args(argv)
    figures = count(args.method, args.common)
    print(f"{args.method}: {figures['total_lines']} lines to read = {figures['method_lines']} "
          f"(method) + {figures['common_lines']} ({figures['definitions']} common.py definitions,"
          f" {figures['direct_names']} used directly)")
    print(f"jumps: {figures['jumps']}, backwards: {figures['backward_jumps']}")
    if figures["common_lines_above_internals"] is not None:
        print(f"of the common.py lines, above the internals line: "
              f"{figures['common_lines_above_internals']}")
    if args.list:
        print(" -> ".join(map(str, figures["path"])))


if __name__ == "__main__":
    main()
