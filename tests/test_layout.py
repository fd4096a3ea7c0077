"""The house rules of DESIGN.md section 3, checked from the imports so that they stay kept.

Every module of ssgan_dist is read with ``ast`` (every import, function-level ones
included) and its imports of ssgan_dist modules form a graph: no cycle in it, and the
layering rules below hold for everything a module reaches, not only what it names.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ssgan_dist"
SAMPLE_KEYS = ("sketch.png", "label.png", "image.jpg")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str) -> str | None:
    """The ssgan_dist module ``name`` (a module or something in one) is, or None if foreign."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> dict[str, int]:
    """{imported ssgan_dist module: line} of every import statement in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _reach(module: str) -> dict[str, list[str]]:
    """Every module ``module`` imports directly or through others, with a shortest import chain to it."""
    chains: dict[str, list[str]] = {}
    todo = deque([(module, [module])])
    while todo:
        current, chain = todo.popleft()
        for target in GRAPH[current]:
            if target not in chains:
                chains[target] = [*chain, target]
                todo.append((target, chains[target]))
    return chains


def _in(module: str, areas: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in areas)


def _violations(modules: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for module in (m for m in MODULES if _in(m, modules)):
        for target, chain in sorted(_reach(module).items()):
            # The first forbidden module on the way is the one to name, not all behind it.
            if _in(target, forbidden) and not any(_in(hop, forbidden) for hop in chain[1:-1]):
                bad.append(f"{module} imports {target} (via {' -> '.join(chain)}, "
                           f"line {GRAPH[chain[0]][chain[1]]} of {MODULES[chain[0]].name})")
    return bad


def test_the_graph_reads_every_module_and_its_function_level_imports():
    assert {"ssgan_dist.train", "ssgan_dist.tasks.gan", "ssgan_dist.evaluation.evaluate"} <= set(MODULES)
    # A lazy import inside a function is an edge like any other.
    assert "ssgan_dist.distributed.deepspeed_engine" in GRAPH["ssgan_dist.distributed.engine"]


def test_no_type_checking_imports():
    hidden = [f"{m} line {node.lineno}" for m, path in MODULES.items()
              for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.If) and _is_type_checking(node)]
    assert not hidden, f"imports hidden from the rules under `if TYPE_CHECKING:`: {hidden}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in GRAPH[module]:
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in MODULES:
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


RULES = {
    "models know no training machinery": (
        ("ssgan_dist.models",),
        ("ssgan_dist.data", "ssgan_dist.distributed", "ssgan_dist.telemetry", "ssgan_dist.train", "ssgan_dist.tasks",
         "ssgan_dist.evaluation", "ssgan_dist.cluster")),
    "telemetry is handed its numbers": (
        ("ssgan_dist.telemetry",),
        ("ssgan_dist.train", "ssgan_dist.tasks", "ssgan_dist.models", "ssgan_dist.summary")),
    "evaluation reads shards and knows its rank, no training internals": (
        ("ssgan_dist.evaluation",),
        ("ssgan_dist.train", "ssgan_dist.tasks", "ssgan_dist.telemetry", "ssgan_dist.distributed.engine",
         "ssgan_dist.distributed.deepspeed_engine", "ssgan_dist.distributed.optim", "ssgan_dist.data.loaders",
         "ssgan_dist.data.torch_loader", "ssgan_dist.data.dali_loader", "ssgan_dist.data.synthetic_cache")),
    "data and distributed serve training, they do not train": (
        ("ssgan_dist.data", "ssgan_dist.distributed"),
        ("ssgan_dist.train", "ssgan_dist.tasks", "ssgan_dist.models", "ssgan_dist.telemetry", "ssgan_dist.evaluation")),
}


@pytest.mark.parametrize("rule", RULES)
def test_layering(rule):
    modules, forbidden = RULES[rule]
    bad = _violations(modules, forbidden)
    assert not bad, f"{rule}:\n" + "\n".join(bad)


def test_the_submitter_uses_config_shell_and_the_launch_only():
    allowed = {"ssgan_dist.config", "ssgan_dist.errors", "ssgan_dist.shell", "ssgan_dist.cluster.job"}
    direct = GRAPH["ssgan_dist.cluster.submit"]
    bad = [f"ssgan_dist.cluster.submit imports {m} (line {line})" for m, line in sorted(direct.items())
           if m not in allowed]
    assert not bad, "\n".join(bad)


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are not docstrings."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_sample_keys_are_spelled_in_the_schema_only():
    bad = [f"{m} line {n.lineno}: {n.value!r}" for m, path in MODULES.items() if m != "ssgan_dist.data.schema"
           for n in _code_strings(ast.parse(path.read_text())) if n.value in SAMPLE_KEYS]
    assert not bad, "sample keys outside data/schema.py (use its constants): " + "; ".join(bad)
