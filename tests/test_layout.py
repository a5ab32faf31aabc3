"""The package's layout holds: no import cycles, rooms that don't lean on each other, a wheel that ships the
migrations and not the dev stack."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import exporter
from tests.support.env import ROOT

PRODUCT_PACKAGES = ("bridge", "service", "history", "receiver", "simulator", "rules", "report", "web")


def _modules(package: str) -> list[str]:
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
        # Generated gRPC stubs aside; __main__ modules run their command when imported.
        if ".proto." not in info.name + "." and not info.name.endswith(".__main__"):
            names.append(info.name)
    return sorted(names)


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None
    assert spec.origin is not None
    return Path(spec.origin)


def _imports_at_import_time(module: str) -> set[str]:
    """Project modules imported at module level (``TYPE_CHECKING`` blocks included: a cycle there is a
    cycle in the design even if Python tolerates it); imports inside functions are deliberate laziness."""
    tree = ast.parse(_source(module).read_text(encoding="utf-8"))
    found: set[str] = set()
    package = module if _source(module).name == "__init__.py" else module.rpartition(".")[0]
    for node in tree.body:
        candidates = [node]
        if isinstance(node, ast.If):  # if TYPE_CHECKING:
            candidates = [*node.body, *node.orelse]
        for stmt in candidates:
            if isinstance(stmt, ast.ImportFrom):
                base = stmt.module or ""
                if stmt.level:  # relative: climb level - 1 packages from this one
                    parts = package.split(".")
                    base = ".".join([*parts[: len(parts) - stmt.level + 1], base])
                for alias in stmt.names:
                    found.add(f"{base}.{alias.name}")
                    found.add(base)
            elif isinstance(stmt, ast.Import):
                found.update(alias.name for alias in stmt.names)
    return {name for name in found if name.split(".")[0] in {"exporter", "devstack"}}


def _graph() -> dict[str, set[str]]:
    modules = _modules("exporter") + _modules("devstack")
    known = set(modules)
    return {m: {i for i in _imports_at_import_time(m) if i in known and i != m} for m in modules}


def test_every_module_imports() -> None:
    for module in _modules("exporter") + _modules("devstack"):
        importlib.import_module(module)


def test_no_import_cycles() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for target in sorted(graph[node]):
            # A package's __init__ importing nothing of its children keeps "pkg" -> "pkg.mod" edges honest.
            visit(target, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_the_shipped_package_never_imports_the_dev_stack() -> None:
    offenders = {m: sorted(i for i in deps if i.startswith("devstack")) for m, deps in _graph().items()}
    assert {m: d for m, d in offenders.items() if d and m.startswith("exporter")} == {}


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        ("exporter.receiver", ("exporter.service", "exporter.bridge", "exporter.simulator")),
        ("exporter.service", ("exporter.receiver", "exporter.simulator")),
        ("exporter.simulator", ("exporter.service", "exporter.receiver", "exporter.history")),
        ("exporter.bridge", ("exporter.service", "exporter.receiver", "exporter.history")),
    ],
)
def test_products_do_not_lean_on_each_other(room: str, forbidden: tuple[str, ...]) -> None:
    leaning = {
        module: sorted(d for d in deps if d.startswith(forbidden))
        for module, deps in _graph().items()
        if module.startswith(room)
    }
    assert {m: d for m, d in leaning.items() if d} == {}


def test_the_root_holds_at_most_a_dozen_modules_and_one_package_per_product() -> None:
    root = Path(exporter.__file__).parent
    modules = sorted(p.name for p in root.glob("*.py"))
    assert len(modules) <= 12, modules
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert set(PRODUCT_PACKAGES) <= packages


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=ROOT,
        check=True,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(build), "HOME": str(build)},
        timeout=300,
    )
    (path,) = out.glob("dict_rate_limit_exporter-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_ships_the_migrations_and_package_data(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    migrations = sorted(p.name for p in (ROOT / "sql").glob("*.sql"))
    assert migrations, "no migrations in sql/"
    assert {f"exporter/history/sql/{name}" for name in migrations} <= names
    assert "exporter/bridge/proto/rate_limit.proto" in names
    assert "exporter/simulator/scenarios/default.yaml" in names
    assert "exporter/py.typed" in names


def test_the_wheel_carries_no_dev_stack_and_no_tests(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert tops == {"exporter", *[t for t in tops if t.endswith(".dist-info")]}


def test_no_script_edits_sys_path_to_find_the_package() -> None:
    """bench/, dashboards/, devstack/, tests/ and the package import the installed package (issue 10)."""
    edits = []
    for folder in ("exporter", "devstack", "bench", "dashboards", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "path"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"
                ):
                    edits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert edits == []


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_docs_links_and_named_test_files_exist() -> None:
    """README and docs name the paths as they are (issue 10 moved every module and test into rooms)."""
    missing = []
    for document in _documents():
        text = document.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            external = target.startswith(("http://", "https://", "mailto:"))
            if not external and not (document.parent / target).exists():
                missing.append(f"{document.name}: link {target}")
        named_files = r"`((?:tests|bench|devstack|exporter|dashboards|scripts)/[\w./-]+\.py)`"
        for named in re.findall(named_files, text):
            if not (ROOT / named).exists():
                missing.append(f"{document.name}: {named}")
    assert missing == []
