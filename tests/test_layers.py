"""The package's layers point one way, read from the source (every import, lazy ones included):

    utils  <-  models, diffusion, synthetic  <-  data, metrics  <-  config  <-  eval  <-  lightning
           <-  train.py, evaluate.py, pipeline.py, data_prep

``vdm`` never imports ``data_prep`` or a script, one script never imports another, no two modules import
each other (directly or round a cycle), only the layers that drive training import Lightning or Hydra,
and no module imports another module's private names.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "evaluate", "pipeline")
#: what each vdm package may import of vdm (besides itself)
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "models": {"utils"},
    "diffusion": set(),
    "synthetic": set(),
    "data": {"utils"},
    "metrics": {"utils", "models", "synthetic"},
    "config": {"utils", "models", "metrics"},
    "eval": {"utils", "models", "diffusion", "synthetic", "data", "metrics", "config"},
    "lightning": {"utils", "models", "diffusion", "synthetic", "data", "metrics", "config", "eval"},
}
#: third-party packages that only the training layers (and the data module, a LightningDataModule) import
TRAINING_ONLY = {"lightning": {"lightning", "config", "data"}, "hydra": {"lightning"}}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted ("vdm.models.dit", "train")
    target: str  # imported module, dotted
    names: tuple[str, ...]  # names taken from it (from-imports)
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> Iterator[Import]:
    """Every absolute import in a file, at any depth (lazy imports in functions count)."""
    source = module_name(path, root)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(source, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield Import(source, node.module, tuple(a.name for a in node.names), node.lineno)


def project_imports(root: Path) -> list[Import]:
    files = [*root.glob("vdm/**/*.py"), *root.glob("data_prep/*.py"), *(root / f"{s}.py" for s in SCRIPTS)]
    return [imp for f in sorted(files) if f.is_file() for imp in imports_of(f, root)]


def layer(module: str) -> str:
    """``vdm.<package>`` of a vdm module, else its top-level name (``data_prep``, ``train`` ...)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "vdm" and len(parts) > 1 else parts[0]


def violations(imports: list[Import], modules: set[str]) -> list[str]:
    """Every arrow that points the wrong way, as ``source:line -> target (rule)``."""
    bad = []
    for imp in imports:
        src, dst = imp.source, imp.target
        where = f"{src}:{imp.line} -> {dst}"
        inside = src.split(".")[0] == "vdm"
        top = dst.split(".")[0]
        if inside and top in ("data_prep", "tests", "bench", *SCRIPTS):
            bad.append(f"{where} (vdm never imports {top})")
        elif src in SCRIPTS and top in SCRIPTS and top != src:
            bad.append(f"{where} (one script never imports another)")
        elif inside and top == "vdm" and layer(dst) not in (layer(src), "vdm"):
            if layer(dst) not in ALLOWED.get(layer(src), set()):
                bad.append(f"{where} (vdm.{layer(src)} may import {sorted(ALLOWED.get(layer(src), ()))})")
        elif inside and top in TRAINING_ONLY and layer(src) not in TRAINING_ONLY[top]:
            bad.append(f"{where} (only {sorted(TRAINING_ONLY[top])} import {top})")
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private and top in ("vdm", "data_prep", *SCRIPTS) and dst != src:
            bad.append(f"{where} (private names {private})")
    return bad + [f"cycle: {' -> '.join(c)}" for c in cycles(imports, modules)]


def cycles(imports: list[Import], modules: set[str]) -> list[list[str]]:
    """Import cycles between project modules (each found once, from its smallest module)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        target = imp.target
        # `from vdm.models import dit` imports the module vdm.models.dit
        candidates = [f"{target}.{n}" for n in imp.names] + [target]
        hit = next((c for c in candidates if c in modules and c != imp.source), None)
        if hit is not None and imp.source in graph:
            graph[imp.source].add(hit)
    found: list[list[str]] = []
    for start in sorted(graph):
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    if min(path) == start:
                        found.append([*path, start])
                elif nxt not in seen and nxt > start:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def project_modules(root: Path) -> set[str]:
    files = [*root.glob("vdm/**/*.py"), *root.glob("data_prep/*.py"), *(root / f"{s}.py" for s in SCRIPTS)]
    return {module_name(f, root) for f in files if f.is_file()}


def test_layers_point_one_way() -> None:
    bad = violations(project_imports(ROOT), project_modules(ROOT))
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_every_vdm_package_has_a_layer() -> None:
    packages = {p.name for p in (ROOT / "vdm").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED), f"give each package its place in ALLOWED: {packages ^ set(ALLOWED)}"


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


GOOD = {
    "vdm/__init__.py": "", "vdm/utils/__init__.py": "", "vdm/utils/io.py": "import os\n",
    "vdm/models/__init__.py": "", "vdm/models/dit.py": "import torch\nfrom vdm.utils.io import f\n",
    "vdm/lightning/__init__.py": "",
    "vdm/lightning/module.py": "from vdm.models.dit import x\nimport lightning\n",
    "train.py": "from vdm.lightning.module import y\nfrom data_prep.prepare import z\n",
    "data_prep/__init__.py": "", "data_prep/prepare.py": "from vdm.models import dit\n",
}


@pytest.mark.parametrize(
    "change, rule",
    [
        ({"vdm/models/dit.py": "from vdm.lightning.module import y\n"}, "vdm.models may import ['utils']"),
        ({"vdm/utils/io.py": "def f():\n    from vdm.models.dit import x\n"}, "vdm.utils may import []"),
        ({"vdm/models/dit.py": "from data_prep.prepare import z\n"}, "vdm never imports data_prep"),
        ({"vdm/lightning/module.py": "import train\n"}, "vdm never imports train"),
        ({"evaluate.py": "from train import setup_run\n"}, "one script never imports another"),
        ({"vdm/models/dit.py": "import lightning.pytorch\n"}, "import lightning"),
        ({"vdm/lightning/module.py": "from vdm.models.dit import _helper\n"}, "private names ['_helper']"),
        ({"vdm/models/dit.py": "from vdm.models import other\n",
          "vdm/models/other.py": "import vdm.models.dit\n"},
         "cycle: vdm.models.dit -> vdm.models.other -> vdm.models.dit"),
    ],
)
def test_an_upward_arrow_is_caught(tmp_path: Path, change: dict[str, str], rule: str) -> None:
    """The checker itself: a clean tree passes; each kind of wrong import, added to it, is reported."""
    write_tree(tmp_path, GOOD)
    assert violations(project_imports(tmp_path), project_modules(tmp_path)) == []
    write_tree(tmp_path, change)
    bad = violations(project_imports(tmp_path), project_modules(tmp_path))
    assert any(rule in b for b in bad), bad


def test_cycle_finder_reports_each_cycle_once() -> None:
    imports = [Import(a, b, (), 1) for a, b in itertools.pairwise(["a", "b", "c", "a"])]
    assert cycles(imports, {"a", "b", "c"}) == [["a", "b", "c", "a"]]
