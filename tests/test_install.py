"""Installing without compiling, building on request (fastreg/_build.py, docs/install.md).

The pieces, without a compiler: fastreg/_build.py loads without fastreg (setup.py loads it
by path); the cache key follows torch, the flags and the sources; the lock lets one
process build while the others wait, then find the build; the loader imports a cached
build when no fastreg._C is installed and otherwise warns once, naming the command. The
real `pip install .` with build isolation (it fetches setuptools and wheel from the index)
runs where FASTREG_TEST_INSTALL=1 (`make test-install`, in CI); the real compile (minutes)
is `python -m fastreg build`, tried by hand.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import requires_extension

ROOT = Path(__file__).resolve().parent.parent
SITE = sysconfig.get_paths()["purelib"]


def load_build_module():
    spec = importlib.util.spec_from_file_location(
        "fastreg_build_test", ROOT / "fastreg" / "_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def build(monkeypatch, tmp_path):
    """fastreg/_build.py loaded by path, with the cache in tmp_path/cache and a copy of
    csrc/ to change."""
    module = load_build_module()
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    monkeypatch.setattr(module, "csrc_dir", lambda: str(csrc))
    monkeypatch.setenv("FASTREG_CACHE", str(tmp_path / "cache"))
    return module


def test_build_module_loads_without_fastreg_or_torch():
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location("
        f"'b', {str(ROOT / 'fastreg' / '_build.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastreg', 'torch')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cache_root(monkeypatch, tmp_path):
    module = load_build_module()
    monkeypatch.setenv("FASTREG_CACHE", str(tmp_path / "c"))
    assert module.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("FASTREG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert module.cache_root() == str(tmp_path / "x" / "fastreg")


def test_cache_key_follows_torch_flags_and_sources(build, tmp_path):
    import torch

    cpu = build.spec(with_cuda=False)
    key = build.cache_key(cpu)
    assert key == build.cache_key(build.spec(with_cuda=False))  # stable
    assert key.startswith(f"torch{torch.__version__.replace('+', '_')}-cpu-")
    assert sysconfig.get_config_var("SOABI") in key
    if torch.version.cuda:
        assert build.cache_key(build.spec(with_cuda=True)) != key
    assert build.cache_key(dict(cpu, cxx=cpu["cxx"] + ["-DX"])) != key
    header = tmp_path / "csrc" / "device" / "philox.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert build.cache_key(cpu) != key


def test_spec_is_what_setup_py_compiles():
    spec = load_build_module().spec(with_cuda=False, root=str(ROOT))
    assert spec["sources"] == sorted(spec["sources"])
    assert (
        "csrc/ops/module.cpp" in spec["sources"] and "csrc/cpu/dropout_cpu.cpp" in spec["sources"]
    )
    assert not any(s.endswith(".cu") for s in spec["sources"])
    assert "-ffp-contract=off" in spec["cxx"] and "-fopenmp" in spec["link"]
    text = (ROOT / "setup.py").read_text()
    assert "spec(root=ROOT)" in text and "-ffp-contract" not in text  # flags defined once


def test_lock_admits_one_process_at_a_time(build, tmp_path):
    spans = []

    def hold():
        with build.file_lock(str(tmp_path / "x.lock")):
            start = time.monotonic()
            time.sleep(0.2)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]  # each its own open file
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_concurrent_builds_compile_once_and_share_the_cache(build, monkeypatch):
    from torch.utils import cpp_extension

    calls = []

    def fake_load(name, sources, build_directory, is_python_module, **kwargs):
        assert name == "_C" and not is_python_module
        calls.append(sources)
        time.sleep(0.3)  # the others wait at the lock meanwhile
        path = os.path.join(build_directory, "_C.so")
        Path(path).write_text("compiled")
        return path

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert build.find_cached(build.spec(with_cuda=False)) is None
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(build.build(with_cuda=False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1 and len(paths) == 3
    folder = os.path.dirname(paths[0])
    assert os.path.dirname(folder) == build.cache_root()
    assert os.path.basename(folder) == build.cache_key(build.spec(with_cuda=False))
    assert json.load(open(os.path.join(folder, "complete.json")))["module"] == "_C.so"
    assert build.find_cached(build.spec(with_cuda=False)) == paths[0]
    build.build(with_cuda=False, force=True)
    assert len(calls) == 2


def test_an_unfinished_build_is_not_found(build):
    spec = build.spec(with_cuda=False)
    folder = Path(build.cache_root()) / build.cache_key(spec)
    folder.mkdir(parents=True)
    (folder / "_C.so").write_text("half written")
    assert build.find_cached(spec) is None


def package_copy(tmp_path):
    """fastreg/ without its compiled module (and csrc/ beside it, as in a checkout)."""
    target = tmp_path / "pkg"
    shutil.copytree(
        ROOT / "fastreg",
        target / "fastreg",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.sources-sha256"),
    )
    (target / "csrc").symlink_to(ROOT / "csrc")
    return target


def run_isolated(code, path, cache, **env):
    """`code` in a Python that sees `path` and torch's site-packages but no .pth files
    (-S: an editable install of fastreg there would otherwise be found)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{path}{os.pathsep}{SITE}",
        "FASTREG_CACHE": str(cache),
        **env,
    }
    for name in ("FASTREG_BACKEND", "FASTREG_BUILD_ON_IMPORT"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-S", "-W", "always::RuntimeWarning", "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=path,
        timeout=300,
    )


IMPORT = (
    "import fastreg, torch\n"
    "print(fastreg.info()['backend'], fastreg._ops._C and fastreg._ops._C.__file__)\n"
    "if fastreg.info()['backend'] == 'extension':\n"
    "    x = torch.ones(1000)\n"
    "    assert torch.equal(fastreg.dropout(x, 0.0), x)\n"
)


def place_cached_build(path, cache):
    """The compiled fastreg._C copied into the cache folder that `path`'s fastreg looks in."""
    result = subprocess.run(
        [sys.executable, "-S", str(path / "fastreg" / "_build.py"), "--print-cache"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SITE, "FASTREG_CACHE": str(cache)},
    )
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.parent == cache
    folder.mkdir(parents=True)
    compiled = next((ROOT / "fastreg").glob("_C.*.so"))
    shutil.copy2(compiled, folder / "_C.so")
    (folder / "complete.json").write_text(json.dumps({"module": "_C.so"}))
    return folder


@requires_extension
def test_loader_without_C_warns_once_then_imports_a_cached_build(tmp_path):
    path, cache = package_copy(tmp_path), tmp_path / "cache"
    result = run_isolated(IMPORT, path, cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reference", "None"]
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, result.stderr
    assert "fastreg._C is not installed" in warnings[0]
    assert "`python -m fastreg build`" in warnings[0]

    result = run_isolated(IMPORT, path, cache, FASTREG_BACKEND="extension")
    assert result.returncode != 0 and "no cached build" in result.stderr

    folder = place_cached_build(path, cache)
    result = run_isolated(IMPORT, path, cache, FASTREG_BACKEND="extension")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["extension", str(folder / "_C.so")]
    assert "RuntimeWarning" not in result.stderr


@pytest.mark.skipif(
    os.environ.get("FASTREG_TEST_INSTALL") != "1",
    reason="pip install with build isolation fetches setuptools and wheel "
    "(FASTREG_TEST_INSTALL=1, make test-install)",
)
@requires_extension
def test_pip_install_with_build_isolation(tmp_path):
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # no torch where the wheel is built (build isolation): a pure-Python wheel
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("fastreg-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        f"fastreg/csrc/{p.relative_to(ROOT / 'csrc')}"
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in (".h", ".cuh", ".cpp", ".cu")
    }
    assert sources <= names and "fastreg/_build.py" in names
    assert not any(n.endswith(".so") for n in names)
    # installed (torch from this environment): the reference, then the cached build
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    cache = tmp_path / "cache"
    result = run_isolated(IMPORT, target, cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "reference" and "python -m fastreg build" in result.stderr
    folder = place_cached_build(target, cache)
    result = run_isolated(IMPORT, target, cache, FASTREG_BACKEND="extension")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["extension", str(folder / "_C.so")]
