"""Shared test set-up. Tests never reach a model hub: HF_HUB_OFFLINE is forced here."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402

# -- temporary folders: a module's are emptied when it ends -------------------------------
# The model files tests write add up to ~18 GB over a session, more than a CI machine's
# temporary space holds. A passing test's tmp_path goes at once (tmp_path_retention_policy in
# pyproject.toml); folders a module made through tmp_path_factory are emptied when the module
# ends, unless one of its tests failed (kept to look at) or a session fixture owns them.

_SESSION_FOLDERS: set[Path] = set()


@pytest.fixture(scope="module", autouse=True)
def _module_folders_emptied(request, tmp_path_factory):
    """Autouse at module scope, so set up before the module's other module fixtures and torn
    down after them. Each folder is made again empty: its numbered name stays taken, so a later
    module never gets a path that an in-process cache saw with other contents."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        return
    for folder in set(base.iterdir()) - before - _SESSION_FOLDERS:
        if folder.is_dir() and not folder.is_symlink():  # pytest's "<name>current" links to the newest
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(exist_ok=True)


def pytest_terminal_summary(terminalreporter) -> None:
    """The temporary folder's free space at the end (even under -q): the first thing to read when a
    run's last modules fail to write their files."""
    folder = tempfile.gettempdir()
    terminalreporter.write_line(f"temporary folder {folder}: {shutil.disk_usage(folder).free / 2**30:.1f} GiB free")


def _session_folder(tmp_path_factory, name: str) -> Path:
    """A temporary folder that lives as long as the test session (for session fixtures)."""
    folder = tmp_path_factory.mktemp(name)
    _SESSION_FOLDERS.add(folder)
    return folder


# -- tiny Stable Diffusion models (see tests/tiny_models.py) ---------------------------

@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A models folder: checkpoints/tiny-<variant>.safetensors (original layout),
    checkpoints/tiny-<variant>-diffusers/ and vae/tiny-vae.safetensors, for the
    variants sd1, sd2, sd2-v and sdxl. Built once per test session (~2 s)."""
    from diffusers.utils import logging as dlog

    import tiny_models

    dlog.disable_progress_bar()
    return tiny_models.make_models_folder(_session_folder(tmp_path_factory, "models"))


@pytest.fixture()
def tiny_env(tiny_models_dir, tmp_path):
    """An Environment over a fresh data folder whose models folder is ``tiny_models_dir``
    (node_call.environment_over: its own CPU model manager, unloaded after the test)."""
    from node_call import environment_over

    yield from environment_over(tiny_models_dir, tmp_path)


# -- the editor's browser tests (see tests/browser_support.py) ---------------------------
# One definition for every editor test module; a module that needs another server (its own
# models or workflows) or browser defines a fixture of the same name, which takes precedence.

@pytest.fixture(scope="module")
def server(request, tmp_path_factory, tiny_models_dir):
    """Kiln's server on a loopback port (browser_support.Server), with a data folder of this test module's own. A module
    that sets ``MODEL_JOBS = False`` runs no model job: its server skips the model libraries' warm-up."""
    from browser_support import Server

    srv = Server(tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_")), tiny_models_dir,
                 warm_up=getattr(request.module, "MODEL_JOBS", True))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from browser_support import launch_browser

    yield from launch_browser()


@pytest.fixture
def editor(browser, server):
    """The editor open on ``server``; fails the test on any console error it did not expect."""
    from browser_support import open_editor

    ed = open_editor(browser, server)
    yield ed
    ed.close_checked()
