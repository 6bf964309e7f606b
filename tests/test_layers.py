"""The tree's layers, checked: a module imports only from its own layer or the layers below it.

    values     configs (schema, errors, strict JSON), stream.frame, stream.picture, detector.result
    io         stream (sources, decoding, footage, batching, synthetic footage, video writing)
    detector   detector (backbone, bank, SPADE, frame scores, fitting)
    consumers  sinks, evaluation
    app        app (live pipeline, its stats and metrics server, every CLI command)
    entry      run_stream

Every import counts, also one inside a function: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, list[str]]] = [
    ("values", ["configs", "stream.frame", "stream.picture", "detector.result"]),
    ("io", ["stream"]),
    ("detector", ["detector"]),
    ("consumers", ["sinks", "evaluation"]),
    ("app", ["app"]),
    ("entry", ["run_stream"]),
]
RANK = {prefix: i for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int | None:
    """The rank of the most specific layer prefix naming `module`; None for third-party modules."""
    best = None
    for prefix, rank in RANK.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported(tree: ast.AST, package: str) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from stream.frame import Frame` -> stream.frame.Frame, `from stream import avio` -> stream.avio:
            # the most specific layer prefix of each decides
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def modules():
    for top in ("configs", "stream", "detector", "sinks", "evaluation", "app"):
        yield from sorted((ROOT / top).rglob("*.py"))
    yield ROOT / "run_stream.py"


def test_every_module_has_a_layer():
    for path in modules():
        assert layer_of(module_name(path)) is not None, path


@pytest.mark.parametrize("path", list(modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_higher_layer(path):
    name = module_name(path)
    own = layer_of(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    bad = []
    for target in imported(ast.parse(path.read_text(), str(path)), package):
        rank = layer_of(target)
        # `from stream import frame` names both `stream` and `stream.frame`: judge the most specific
        if rank is not None and rank > own:
            bad.append(f"{target} ({LAYERS[rank][0]})")
    assert not bad, f"{name} ({LAYERS[own][0]}) imports from a higher layer: {', '.join(sorted(bad))}"


def test_the_check_catches_an_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from app.pipeline import Pipeline\n")
    assert any(layer_of(t) > layer_of("detector.detector") for t in imported(tree, "detector"))
