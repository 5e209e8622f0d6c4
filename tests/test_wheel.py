"""A built wheel carries everything the CLI runs: built from this checkout, installed into a fresh
venv with no checkout on the path, and run from there."""

from __future__ import annotations

import os
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding only the wheel; the test venv's dependencies are visible by a plain path
    entry, which does not run their .pth files, so this checkout's editable install stays out."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
            str(ROOT)], root, env)
    (wheel,) = (root / "dist").glob("dit_accel-*.whl")
    target = root / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    purelib = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "test_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], root, env)
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env['PATH']}"
    return root, env


def test_the_wheel_runs_without_the_checkout(installed_wheel):
    root, env = installed_wheel
    where = _check(["python", "-c", "import dit_accel, dit_accel.pipelines, dit_accel.ui; print(dit_accel.__file__)"],
                   root, env)
    assert str(ROOT) not in where and "site-packages" in where
    for command in (["--help"], ["ui", "--help"], ["bench", "--help"], ["tune", "--help"]):
        _check(["dit-accel", *command], root, env)
    _check(["dit-accel", "generate", "--model", "tiny:sd3", "--steps", "2", "--plan", "ras:sample_ratio=0.5",
            "--quiet", "--out", str(root / "out")], root, env)
    assert (root / "out" / "grid.png").is_file() and (root / "out" / "summary.json").is_file()
    _check(["python", "-c", "import importlib.resources as r; "
            "assert (r.files('dit_accel') / 'assets' / 'reference_image' / 'model_index.json').is_file()"], root, env)


def test_the_ui_serves_from_the_wheel(installed_wheel):
    """`dit-accel ui` from the installed wheel serves its page (the wheel once shipped without `dit_accel.ui`)."""
    root, env = installed_wheel
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["dit-accel", "ui", "--model", "tiny:sd3", "--port", str(port)], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"dit-accel ui exited:\n{server.stderr.read()[-3000:]}"
            try:
                with direct.open(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200 and "gradio" in page.read().decode().lower()
                    break
            except OSError:
                assert time.monotonic() < deadline, "dit-accel ui did not serve its page within 180 s"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
