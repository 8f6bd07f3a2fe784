"""Imports between the project's own modules run one way: no module imports (directly or
through others, at the top or inside a function) a module that imports it back. A cycle works
only while every import in it is deferred to call time, and breaks as soon as one is not."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"fastlora": "fastlora", "fastlora.kernels": "kernels", "bench": "bench", "examples": "examples"}


def _modules():
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if f.endswith(".py"):
                mods[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(ROOT, folder, f)
    return mods


def _targets(mods, cur, node):
    """The project modules an import statement of module ``cur`` loads. ``from pkg import sub``
    loads ``pkg.sub`` (and ``pkg`` only when a name is not a submodule); a module's own parent
    packages are left out: they are always already being imported."""
    package = cur if mods[cur].endswith("__init__.py") else cur.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
        out = subs if len(subs) == len(node.names) else [base, *subs]
    parents = {cur.rsplit(".", i)[0] for i in range(1, cur.count(".") + 1)}
    return {m for m in out if m in mods and m != cur and m not in parents}


def import_graph():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        graph[name] = set().union(*[_targets(mods, name, n) for n in ast.walk(tree)
                                    if isinstance(n, (ast.Import, ast.ImportFrom))] or [set()])
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_project_modules():
    graph = import_graph()
    assert len(graph) > 30 and "fastlora.dropout" in graph["fastlora.ops"]  # the graph was read
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
