"""Shared test set-up. Tests never reach a model hub: HF_HUB_OFFLINE is forced here."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))


# -- tiny Stable Diffusion models (see tests/tiny_models.py) ---------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A models folder: checkpoints/tiny-<variant>.safetensors (original layout),
    checkpoints/tiny-<variant>-diffusers/ and vae/tiny-vae.safetensors, for the
    variants sd1, sd2, sd2-v and sdxl. Built once per test session (~2 s)."""
    from diffusers.utils import logging as dlog

    import tiny_models

    dlog.disable_progress_bar()
    return tiny_models.make_models_folder(tmp_path_factory.mktemp("models"))


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
    """A real ``kiln serve`` on a loopback port, with a data folder of this test module's own."""
    from browser_support import Server

    srv = Server(tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_")), tiny_models_dir)
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
