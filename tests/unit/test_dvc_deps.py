"""`dvc repro` cannot reuse a stage whose code changed: every project file a stage imports (transitively,
lazy imports inside functions included) is covered by its dvc.yaml deps."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"gaussian_atlas": ROOT / "src" / "gaussian_atlas", "stages": ROOT / "stages", "flows": ROOT / "flows"}


def _module_file(mod: str) -> Path | None:
    parts = mod.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = PACKAGES[parts[0]].joinpath(*parts[1:])
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand
    return None


def _package_of(path: Path) -> list[str]:
    for name, root in PACKAGES.items():
        if path.is_relative_to(root):
            rel = path.relative_to(root).with_suffix("").parts
            return [name, *rel[:-1]] if path.name != "__init__.py" else [name, *rel[:-1]]
    raise ValueError(path)


def imports_of(path: Path) -> set[Path]:
    """Project files ``path`` imports anywhere in its body (module level or inside functions)."""
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path)[: len(_package_of(path)) - node.level + 1]
                m = ".".join(base + ([node.module] if node.module else []))
            else:
                m = node.module or ""
            mods.add(m)
            mods.update(f"{m}.{a.name}" for a in node.names)
    return {f for f in map(_module_file, mods) if f is not None and f != path}


def closure(entry: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(imports_of(f))
    return seen


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_closure_follows_lazy_and_relative_imports():
    train = closure(ROOT / "stages" / "train.py")
    lib = ROOT / "src" / "gaussian_atlas"
    # stages/train.py imports gaussian_atlas.train inside main(); train.py imports .model at module level
    # and .atlas / .render inside functions
    assert {lib / "train.py", lib / "model.py", lib / "atlas.py", lib / "render.py"} <= train
    assert ROOT / "stages" / "common.py" in train


def test_every_stage_depends_on_the_code_it_imports():
    problems = []
    for name, stage in _stages().items():
        cmd = stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"])
        entries = [w for w in cmd.split() if w.startswith("stages.")]
        assert entries, f"stage {name}: cmd does not run a stages.<name> module: {cmd}"
        deps = [str(d).rstrip("/") for d in stage.get("deps", [])]
        for f in sorted(closure(_module_file(entries[0]))):
            rel = f.relative_to(ROOT).as_posix()
            if not any(rel == d or rel.startswith(d + "/") for d in deps):
                problems.append(f"{name}: imports {rel}, not covered by its deps")
    assert not problems, "\n".join(problems)


def test_byte_code_is_not_a_dependency():
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored
