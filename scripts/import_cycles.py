"""Import cycles among a package's modules, function-level imports included (grimp parses every import in the AST).

    python scripts/import_cycles.py [PACKAGE ...]   # default: tip_cli; exit status 1 when a cycle exists

Prints each strongly connected component of the module import graph (a set of modules that all reach each other)
and one shortest cycle through it, with the file and line of every import on that cycle. Imports of packages
outside PACKAGE (torch, vllm, wandb, datasets, ...) are not edges of this graph, so an optional heavy dependency
imported where it is used never makes a cycle.
"""

from __future__ import annotations

import sys
from collections import deque

import grimp


def components(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted; sorted by size."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    scc.append(member)
                    if member == node:
                        break
                if len(scc) > 1:
                    out.append(sorted(scc))
    return sorted(out, key=lambda c: (-len(c), c))


def shortest_cycle(graph: grimp.ImportGraph, scc: list[str]) -> list[str]:
    """A shortest cycle inside one component, as [m0, m1, ..., m0] (breadth-first from each member)."""
    members, best = set(scc), None
    for start in scc:
        prev: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for child in sorted(graph.find_modules_directly_imported_by(node) & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    cycle = [start, *reversed(path[:-1]), start]
                    if best is None or len(cycle) < len(best):
                        best = cycle
                    queue.clear()
                    break
                if child not in prev:
                    prev[child] = node
                    queue.append(child)
    return best or []


def report(packages: list[str]) -> int:
    graph = grimp.build_graph(*packages, cache_dir=None)
    found = components(graph)
    for scc in found:
        print(f"cycle among {len(scc)} modules: {', '.join(scc)}")
        cycle = shortest_cycle(graph, scc)
        print("  shortest: " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:], strict=False):
            for d in graph.get_import_details(importer=a, imported=b)[:1]:
                print(f"    {a}:{d['line_number']}  {d['line_contents']}")
    if not found:
        print(f"no import cycles in {', '.join(packages)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(report(sys.argv[1:] or ["tip_cli"]))
