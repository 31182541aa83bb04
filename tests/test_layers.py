"""The import rules between layers, read from the import graph so they cannot rot.

Every `import` and `from ... import` in every module counts, including the lazy ones inside
functions: a lazy import still makes the arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernel", "transports", "protocols", "perf")

# (importer prefix, forbidden prefix, why)
RULES = (
    ("kernel", "transports", "the kernel finds transports by name, through the registry"),
    ("kernel", "protocols", "the kernel finds protocols by name, through the registry"),
    ("kernel", "perf", "the kernel knows nothing of the benchmark harness"),
    ("protocols", "transports", "a protocol runs on any transport"),
    ("protocols", "perf", "protocols know nothing of the benchmark harness"),
    ("transports", "protocols", "a transport carries any protocol"),
    ("transports", "perf", "transports know nothing of the benchmark harness"),
    ("kernel.wire", "kernel.run", "the wire format works without a run"),
    ("kernel.core", "kernel.run", "the node API is readable without the application"),
    ("kernel.core", "kernel.wire", "the node API is readable without the wire format"),
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """`kernel.core` for the modules directly in kernel/, else the module name itself."""
    parts = module.split(".")
    if parts[0] == "kernel" and (len(parts) == 1 or parts[1] not in ("wire", "run")):
        return "kernel.core." + ".".join(parts[1:])
    return module


def imports_of(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            # `from kernel import run` imports the subpackage kernel.run
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Every forbidden arrow under `root`, as 'importer -> imported (why)'."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            importer = layer_of(module)
            imported = sorted(imports_of(path, module))
            for src, dst, why in RULES:
                if not within(importer, src):
                    continue
                hits = [name for name in imported if within(layer_of(name), dst)]
                if hits:  # one line per rule broken, naming the shortest import that breaks it
                    first = min(hits, key=len)
                    out.append(f"{path.relative_to(root)}: {module} -> {first} ({why})")
    return out


def test_the_repository_keeps_the_import_rules():
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("where", "line"),
    [
        ("kernel/host.py", "from transports.inproc import InprocTransport"),
        ("kernel/api.py", "from kernel.run.config import load"),
        ("kernel/api.py", "from kernel.wire import codec"),
        ("kernel/wire/codec.py", "from kernel.run import runner"),
        ("kernel/wire/codec.py", "from ..run.config import load"),
        ("protocols/fedavg.py", "import transports.ray"),
        ("transports/ray.py", "    from protocols.fedavg import build"),
        ("kernel/run/cli.py", "from protocols import learners"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path, where, line):
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            dest = tmp_path / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(path.read_text())
    target = tmp_path / where
    body = f"def _added():\n{line}\n" if line.startswith(" ") else f"{line}\n"
    target.write_text(target.read_text() + "\n" + body)
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(where), found
