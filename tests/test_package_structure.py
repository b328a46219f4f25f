"""The shape of the code: no import circles, the core never imports the service, one source for every
name, a torch-free ``ddpm --help``, short functions in the engine and API packages, documented tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm.names import COMPILE_SETTINGS, PRECISION_SETTINGS, SAMPLERS, SPACINGS, Sampler
from service.engine.request_queue import SCHEDULING_NAMES
from tests.command_in_process import fresh_process_without

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("commands", "ddpm", "kernels", "service")
CORE = ("ddpm", "kernels")  # below the service: they import nothing of it (nor of the command line)
MAX_FUNCTION_LINES = 60  # in the engine and API packages; longer needs "# long: <why>" above the def


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function (a lazy import still ties
    the two modules together)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles() -> None:
    assert _cycles(_graph()) == []


def test_the_core_imports_nothing_of_the_service_or_the_command_line() -> None:
    upward = {(m, i) for m, imports in _graph().items() if m.split(".")[0] in CORE for i in imports if i.split(".")[0] not in CORE}
    assert upward == set()


def test_the_engine_knows_nothing_of_http() -> None:
    engine = [p for name, p in _modules().items() if name.startswith("service.engine")]
    assert engine
    for path in engine:
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in roots if m.split(".")[0] in ("fastapi", "starlette", "uvicorn") or m.startswith("service.api")}, path


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["serve", "--help"]])
def test_the_command_line_answers_without_torch(argv: list[str]) -> None:
    code = fresh_process_without(("torch", "numpy", "triton"))
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]  # 3: it imported one of them
    assert out.stdout.strip()  # it did answer


NAME_LISTS = {"sampler": SAMPLERS, "spacing": SPACINGS, "precision": PRECISION_SETTINGS, "compile setting": COMPILE_SETTINGS,
              "scheduling policy": SCHEDULING_NAMES}  # fmt: skip


def _copies(tree: ast.AST) -> list[tuple[int, str]]:
    """Literal collections (tuple, list, set, Literal[...]) that spell a list's names again (all of them,
    or three or more: ``["on", "off"]`` for a flag is not a copy of the compile settings)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            for what, names in NAME_LISTS.items():
                if len(strings & set(names)) >= min(3, len(names)):
                    found.append((node.lineno, what))
    return found


def test_the_copy_finder_finds_a_copy() -> None:
    tree = ast.parse('X = Literal["ddpm", "ddim", "dpmsolver++"]\nY = ("auto", "on", "off")\nZ = ["on", "off"]')
    assert sorted(_copies(tree)) == [(1, "sampler"), (2, "compile setting")]


def test_every_name_list_is_defined_once() -> None:
    copies = []
    for name, path in _modules().items():
        if name in ("ddpm.names", "service.engine.request_queue"):
            continue
        copies += [f"{path.relative_to(ROOT)}:{line}: a copy of the {what} names" for line, what in _copies(ast.parse(path.read_text()))]
    assert copies == []


def _long_functions(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES and "# long:" not in lines[first - 2]:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_functions_in_the_engine_and_the_api_are_short() -> None:
    long = [f for name, p in _modules().items() if name.startswith(("service.engine", "service.api")) for f in _long_functions(p)]
    assert long == []


def _text_files_in_the_locale(tree: ast.AST) -> list[int]:
    """Lines that read or write a text file in the locale's encoding: ``read_text``/``write_text``, or ``open`` in text
    mode, without ``encoding=`` (ruff's PLW1514 misses a receiver whose type it cannot infer: ``path.read_text()``)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("read_text", "write_text"):
            lines.append(node.lineno)
        elif isinstance(func, ast.Name) and func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                lines.append(node.lineno)
    return lines


def test_the_locale_finder_finds_a_text_file() -> None:
    code = 'a = p.read_text()\nb = p.read_text(encoding="utf-8")\nopen(f, "rb")\nopen(f)\nq.write_text(s)\nopen(f, mode="w")'
    assert _text_files_in_the_locale(ast.parse(code)) == [1, 4, 5, 6]


def test_every_text_file_is_read_and_written_in_utf8() -> None:
    """A file read in the locale's encoding was a 500 under an ASCII locale (the web page; tests/test_process_surroundings)."""
    trees = {path.relative_to(ROOT): ast.parse(path.read_text("utf-8")) for path in _modules().values()}
    found = [f"{path}:{line}" for path, tree in trees.items() for line in _text_files_in_the_locale(tree)]
    assert found == []


def test_every_test_module_says_what_it_pins() -> None:
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


# a sampler is one module of ddpm/samplers (its coefficients, its call plan, its state): nothing else names it.
# Algorithm 2 (``ddpm``) is the paper's chain and every chain's default, so it is left out; a distilled student's
# chain is DDIM by its construction (Salimans & Ho 2022: the student matches two DDIM steps), which the
# distiller and the model card's check pin as data.
PINNED = {"ddpm.distill": {"ddim"}, "ddpm.checkpoint": {"ddim"}}


def _sampler_mentions(tree: ast.AST, imports: bool = True) -> set[str]:
    """The samplers a module names in code: ``Sampler.MEMBER``, a string that is exactly a sampler's name
    (not a docstring), and (``imports``) an import of a sampler's module."""
    from ddpm.samplers import RULES

    members = {member.name: member.value for member in Sampler}
    modules: dict[str, set[str]] = {}
    for name, rule in RULES.items():
        modules.setdefault(rule.__class__.__module__, set()).add(name)
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Sampler" and node.attr in members:
            found.add(members[node.attr])
        elif isinstance(node, ast.Constant) and node.value in SAMPLERS and id(node) not in docstrings:
            found.add(node.value)
        elif imports and isinstance(node, ast.ImportFrom) and node.module in modules:
            found |= modules[node.module]
    return found - {Sampler.DDPM.value}


def test_the_sampler_finder_finds_a_sampler() -> None:
    tree = ast.parse('"""restart"""\nif s == "ddim" or s is Sampler.RESTART:\n    from ddpm.samplers.dpm_solver import dpmsolver_table')
    assert _sampler_mentions(tree) == {"ddim", "restart", "dpmsolver++", "sde-dpmsolver++"}
    assert _sampler_mentions(tree, imports=False) == {"ddim", "restart"}


def test_no_module_outside_a_samplers_own_names_it() -> None:
    from ddpm.samplers import RULES

    owner = {name: rule.__class__.__module__ for name, rule in RULES.items()}
    assert len(set(owner.values())) == 4  # one module per sampler; the ODE and SDE forms of DPM-Solver++ share one
    named = []
    for module, path in _modules().items():
        if module == "ddpm.names":  # the list of names, and the defaults
            continue
        # a sampler may build on another's maths (restart on SDE-DPM-Solver++): imports inside the package are fine
        mentions = _sampler_mentions(ast.parse(path.read_text()), imports=not module.startswith("ddpm.samplers."))
        for sampler in sorted(mentions - PINNED.get(module, set())):
            if module != owner[sampler]:
                named.append(f"{path.relative_to(ROOT)} names the sampler {sampler!r} (its module: {owner[sampler]})")
    assert named == []
