"""The package's layering (issue 38): import-linter's contracts in pyproject.toml, and, for the two namespace
portions its graph does not see (ldlm.export, ldlm.kernels), the same rule read from their source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what each namespace portion may import of ldlm: its own modules and the layers below it
ALLOWED = {
    "export": ("ldlm.export", "ldlm.fast", "ldlm.sampling", "ldlm.kernels", "ldlm.model", "ldlm.inputs",
               "ldlm.paths", "ldlm"),
    "kernels": ("ldlm.kernels", "ldlm.paths"),
}


def test_import_linter_contracts_are_kept():
    pytest.importorskip("importlinter", reason="the test extra installs import-linter")
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports())"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def ldlm_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ldlm in a file, relative ones resolved, those inside functions too."""
    package = "ldlm." + path.parent.name
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = f"{package}.{module}".rstrip(".") if node.level == 1 else "ldlm." + module
            names = [module] if module != "ldlm" else [f"ldlm.{a.name}" if a.name != "__version__" else "ldlm"
                                                      for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "ldlm" or name.startswith("ldlm.")]
    return found


@pytest.mark.parametrize("portion", sorted(ALLOWED))
def test_namespace_portions_import_only_below_them(portion):
    def allowed(module: str) -> bool:
        return any(module == a or (a != "ldlm" and module.startswith(a + ".")) for a in ALLOWED[portion])

    files = sorted((ROOT / portion).glob("*.py"))
    assert files
    wrong = [f"{f.name}:{line} imports {module}" for f in files for line, module in ldlm_imports(f)
             if not allowed(module)]
    assert not wrong, f"ldlm.{portion} may import only {ALLOWED[portion]}: {wrong}"


def test_the_source_check_sees_a_wrong_import(tmp_path):
    """The checker above is no formality: an import of the pipeline from a kernel is found."""
    folder = tmp_path / "kernels"
    folder.mkdir()
    (folder / "bad.py").write_text("def f():\n    from ldlm.pipeline import Pipeline\n    from . import native\n")
    assert ldlm_imports(folder / "bad.py") == [(2, "ldlm.pipeline"), (3, "ldlm.kernels")]
