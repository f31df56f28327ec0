"""Layering: py-libp2p stays inside the overlay.

Every module of the p2pcompute package is parsed (not imported) and each import statement,
top-level or inside a function, is checked: only modules under p2pcompute/overlay/ may import
``libp2p``. Everything above the overlay reaches peers through :class:`~p2pcompute.overlay.Node`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import p2pcompute

PACKAGE = Path(p2pcompute.__file__).resolve().parent

# Modules outside the overlay that still import libp2p, each with its reason. Keep this short.
ALLOWED: set[str] = set()


def _libp2p_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names = [node.module]
        else:
            continue
        found += [f"line {node.lineno}: {n}" for n in names if n == "libp2p" or n.startswith("libp2p.")]
    return found


def test_only_the_overlay_imports_libp2p() -> None:
    offenders: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("overlay/") or rel in ALLOWED:
            continue
        found = _libp2p_imports(path)
        if found:
            offenders[rel] = found
    assert not offenders, f"py-libp2p imported outside p2pcompute/overlay/: {offenders}"


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    # the lane used to import libp2p inside a method; the walk must find such imports too
    module = tmp_path / "m.py"
    module.write_text(
        "import libp2pish\n"
        "from p2pcompute.libp2p_free import x\n"
        "def f():\n"
        "    from libp2p.peer.id import ID\n"
        "    import libp2p.crypto, os\n"
    )
    assert _libp2p_imports(module) == ["line 4: libp2p.peer.id", "line 5: libp2p.crypto"]
