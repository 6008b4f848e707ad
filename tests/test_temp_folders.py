"""The suite's temporary-folder rule (tests/conftest.py, pyproject.toml): what a passing module
wrote is gone when it ends, what a session fixture or a failing test wrote stays.

The rule runs in an inner pytest session over three small modules, under a copy of the real
conftest and the project's pytest configuration, with a given base folder so that what is left can be
looked at afterwards."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent

SHARED_FIXTURE = '''

@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    folder = _session_folder(tmp_path_factory, "shared")
    (folder / "model.bin").write_bytes(b"1")
    return folder
'''

MODULES = {
    "test_a_writes.py": '''
        import pytest

        @pytest.fixture(scope="module")
        def weights(tmp_path_factory):
            folder = tmp_path_factory.mktemp("weights")
            (folder / "nested").mkdir()
            (folder / "nested" / "unet.bin").write_bytes(b"2")
            return folder

        def test_first(weights, tmp_path):
            (tmp_path / "out.png").write_bytes(b"3")

        def test_second_asks_for_the_session_folder_late(weights, shared):
            assert (shared / "model.bin").read_bytes() == b"1"
        ''',
    "test_b_reads.py": '''
        def test_the_session_folder_outlives_the_module_that_made_it(shared, tmp_path_factory):
            assert (shared / "model.bin").read_bytes() == b"1"
            weights = tmp_path_factory.getbasetemp() / "weights0"
            assert weights.is_dir() and list(weights.iterdir()) == []
        ''',
    "test_c_fails.py": '''
        import pytest

        @pytest.fixture(scope="module")
        def kept(tmp_path_factory):
            folder = tmp_path_factory.mktemp("kept")
            (folder / "evidence.bin").write_bytes(b"4")
            return folder

        def test_fails(kept, tmp_path):
            (tmp_path / "what-went-wrong.txt").write_text("5")
            assert False, "this failure keeps the module's folders"
        ''',
}


def test_passing_modules_leave_nothing_and_failing_ones_keep_their_folders(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text((TESTS / "conftest.py").read_text() + SHARED_FIXTURE)
    for name, text in MODULES.items():
        (project / name).write_text(textwrap.dedent(text))
    base = tmp_path / "base"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", str(project),
         "-c", str(TESTS.parent / "pyproject.toml"), "--basetemp", str(base), str(project)],
        cwd=project, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 3 passed" in proc.stdout, proc.stdout
    assert f"temporary folder {tempfile.gettempdir()}: " in proc.stdout  # the summary's free-space line
    entries = {p.name for p in base.iterdir()}
    assert (base / "shared0" / "model.bin").read_bytes() == b"1"
    assert (base / "weights0").is_dir() and list((base / "weights0").iterdir()) == []
    assert "test_first0" not in entries  # a passing test's own folder went when it ended
    assert (base / "kept0" / "evidence.bin").read_bytes() == b"4"  # the failing module's
    assert (base / "test_fails0" / "what-went-wrong.txt").read_text() == "5"
