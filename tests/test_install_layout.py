"""The repository's top-level folders never shadow another distribution's import name (issue 34).

`kernels/` and `export/` sit at the repository's root, where every `python -m ...` and `python -c ...` started
there puts them on `sys.path` first. Hugging Face's `kernels` distribution, which transformers imports at GPT-2's
import, is a regular package; a `kernels/__init__.py` at the root used to win over it and break every model load.
As namespace portions (no `__init__.py`) they lose to any regular package later on the path. Each check runs a
fresh interpreter in the repository's root, as a user who cloned it would.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN_FOLDERS = ("kernels", "export")  # top-level folders that are subpackages of ldlm, not packages of their own


def run_in_root(code: str, *, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)  # after the root: sys.path[0] is '' for `python -c`
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"from {ROOT}: {code!r} failed:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("name", DESIGN_FOLDERS)
def test_design_folders_are_not_regular_packages(name):
    assert (ROOT / name).is_dir()
    assert not (ROOT / name / "__init__.py").exists(), (
        f"{name}/__init__.py makes the root folder a regular package `{name}` that shadows any installed "
        f"distribution of that name for Python started in the root; keep the code in named modules")


def test_a_distribution_of_the_same_name_wins_from_the_root(tmp_path):
    """A regular package of each design folder's name, later on sys.path than the root, is the one imported."""
    for name in DESIGN_FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'the other distribution of {name}'\n")
    code = ("import json, " + ", ".join(DESIGN_FOLDERS) + "; print(json.dumps({m.__name__: m.WHO for m in ["
            + ", ".join(DESIGN_FOLDERS) + "]}))")
    found = json.loads(run_in_root(code, pythonpath=tmp_path))
    assert found == {name: f"the other distribution of {name}" for name in DESIGN_FOLDERS}


def test_no_installed_import_name_resolves_into_the_repository():
    """Every top-level name an installed distribution provides, looked up from the root, lies outside it."""
    names = sorted(n for n in importlib.metadata.packages_distributions() if n.isidentifier() and n != "ldlm")
    code = f"""
import importlib.util, json
found = {{}}
for name in {names!r}:
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # a broken distribution is not ours to judge
        continue
    if spec is not None:
        found[name] = [spec.origin] + list(spec.submodule_search_locations or [])
print(json.dumps(found))
"""
    found = json.loads(run_in_root(code))
    environment = {Path(sys.prefix).resolve(), Path(sys.exec_prefix).resolve()}  # CI's venv lies in the checkout

    def ours(place: str | None) -> bool:
        path = Path(place).resolve() if place else None
        return bool(path and path.is_relative_to(ROOT) and not any(path.is_relative_to(e) for e in environment))

    inside = {name: places for name, places in found.items() if any(ours(p) for p in places)}
    assert not inside, f"from the repository's root these installed names resolve into it: {inside}"


def test_gpt2_and_ldlm_import_from_the_root():
    """transformers' GPT-2 (which imports Hugging Face's `kernels` where installed) and the installed ldlm."""
    out = run_in_root(
        "import importlib.util, transformers.models.gpt2.modeling_gpt2, ldlm, ldlm.kernels.reference, "
        "ldlm.export.manifest\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
        "print(ldlm.kernels.reference.__file__)\n")
    kernels_origin, reference_file = out.split()
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert kernels_origin in (None, "None"), "no `kernels` distribution, yet `kernels` imports as a module"
    else:  # transformers 5.25 requires it: `import kernels` must give the distribution
        assert kernels_origin != "None" and not Path(kernels_origin).resolve().is_relative_to(ROOT / "kernels")
    assert Path(reference_file).name == "reference.py"
