"""Guards for the design card: standard library only, importable everywhere."""

import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tcprelay")


def package_modules():
    return sorted(
        "tcprelay." + info.name for info in pkgutil.iter_modules([PACKAGE])
    )


def imported_names(path):
    """Absolute module names imported anywhere in a source file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module


def stdlib_dirs():
    paths = sysconfig.get_paths()
    return [os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib")]


def is_stdlib(top):
    """True if the top-level module ``top`` resolves into the standard library."""
    names = getattr(sys, "stdlib_module_names", None)
    if names is not None and top not in names:
        return False
    if top in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(top)
    if spec is None:
        # Platform modules absent here (winreg, msvcrt, ...): trust the list.
        return names is not None
    if spec.origin in ("built-in", "frozen"):
        return True
    origin = os.path.realpath(spec.origin or next(iter(spec.submodule_search_locations)))
    if "site-packages" in origin.split(os.sep) or "dist-packages" in origin.split(os.sep):
        return False
    return any(origin.startswith(d + os.sep) for d in stdlib_dirs())


def test_the_package_has_modules():
    assert "tcprelay.muxado" in package_modules() or "tcprelay.relay" in package_modules()


@pytest.mark.parametrize("module", package_modules())
def test_module_imports_only_the_standard_library(module):
    path = os.path.join(PACKAGE, module.split(".", 1)[1] + ".py")
    outside = []
    for lineno, name in imported_names(path):
        top = name.split(".")[0]
        if top == "tcprelay":
            continue
        if not is_stdlib(top):
            outside.append("%s:%d imports %s" % (os.path.basename(path), lineno, name))
    assert not outside, "imports outside the standard library: %s" % outside


def test_the_checker_rejects_a_third_party_module():
    # pytest itself is installed but is not the standard library.
    assert not is_stdlib("pytest")
    assert is_stdlib("socket") and is_stdlib("json") and is_stdlib("sys")


@pytest.mark.parametrize("module", package_modules())
def test_module_imports_cleanly(module):
    """Import in a fresh interpreter with warnings as errors."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import " + module],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
