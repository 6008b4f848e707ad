"""`kiln run` / `kiln validate` / `kiln nodes` end to end, as a user's script runs them, on a real PNG.

The commands run through ``engine.cli.main``, the function the console script calls, with their
stdout and stderr captured apart: exit codes, what goes to which stream and the files written are
what a shell sees. What only a process of its own shows (the console script as a shell starts it,
Ctrl+C, what a fresh interpreter imports) gets one: each costs seconds of imports.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from server_helpers import kiln_command

RESIZE = {
    "version": 1,
    "params": {"width": "2.width", "height": "2.height", "image": "1.image"},
    "nodes": {
        "1": {"type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"type": "ImageResize", "inputs": {"image": ["1", 0], "width": 32, "height": 24, "mode": "stretch"}},
        "3": {"type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cli"}},
    },
}


def kiln(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    """``kiln ARGS`` in ``cwd``, in this process: its exit code, stdout and stderr."""
    from engine.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(before)
    proc = subprocess.CompletedProcess(["kiln", *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def kiln_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``kiln ARGS`` as a shell starts it: the installed console script in a process of its own."""
    return subprocess.run([*kiln_command(), *args], cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "input").mkdir()
    Image.new("RGB", (64, 48), (200, 40, 10)).save(tmp_path / "input" / "photo.png")
    (tmp_path / "resize.json").write_text(json.dumps(RESIZE))
    return tmp_path


def test_run_saves_the_image_with_the_workflow_in_its_text_chunks(project: Path):
    proc = kiln_process("run", "resize.json", "--set", "width=40", "--set", "2.height=16", cwd=project)
    assert proc.returncode == 0, proc.stderr
    saved = [Path(line) for line in proc.stdout.split()]
    assert len(saved) == 1 and saved[0].parent == project / "output"
    with Image.open(saved[0]) as img:
        assert img.size == (40, 16)
        assert img.getpixel((5, 5))[:3] == (200, 40, 10)
        text = dict(img.text)
    kiln_wf = json.loads(text["kiln_workflow"])
    prompt = json.loads(text["prompt"])
    # --set values are typed by the schema and recorded in what the file embeds
    assert kiln_wf["nodes"]["2"]["inputs"]["width"] == 40
    assert prompt["2"]["inputs"]["height"] == 16 and prompt["2"]["class_type"] == "ImageResize"
    assert json.loads(text["parameters"])["width"] == 40


def test_json_mode_prints_one_event_per_line_and_only_events(project: Path):
    proc = kiln("run", "resize.json", "--json", "--output-dir", "elsewhere", cwd=project, check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "job_started" and kinds[-1] == "job_finished"
    started = [e["node_id"] for e in events if e["type"] == "node_started"]
    assert started == ["1", "2", "3"]
    finished = [e for e in events if e["type"] == "node_finished" and e["node_id"] == "3"][0]
    image = finished["ui"]["images"][0]
    assert (project / "elsewhere" / image.get("subfolder", "") / image["filename"]).is_file()


def test_invalid_workflow_exits_2_and_lists_every_problem(project: Path):
    proc = kiln("run", "resize.json", "--set", "width=abc", "--set", "9.nothing=1",
                "--set", "image=missing.png", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "width" in proc.stderr and "abc" in proc.stderr
    assert "9" in proc.stderr
    assert "missing.png" in proc.stderr
    assert not (project / "output").exists() or not any((project / "output").iterdir())

    proc = kiln("validate", "resize.json", "--set", "width=-5", "--json", cwd=project)
    assert proc.returncode == 2
    errors = json.loads(proc.stdout.splitlines()[-1])["errors"]
    assert any(e["node_id"] == "2" and e["input_name"] == "width" for e in errors)
    assert kiln("validate", "resize.json", cwd=project).returncode == 0


def test_node_failure_exits_1_naming_the_node(project: Path):
    (project / "input" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    proc = kiln("run", "resize.json", "--set", "image=broken.png", cwd=project)
    assert proc.returncode == 1
    assert "LoadImage" in proc.stderr and "broken.png" in proc.stderr


def test_keep_going_saves_the_branch_that_works_and_still_exits_1(project: Path):
    """Two branches: a broken image fails its LoadImage; with -k the other branch's file is saved and
    printed, the failure and what it skipped are named, and the exit code is still 1."""
    (project / "input" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    two = {"version": 1, "nodes": {
        **RESIZE["nodes"],
        "4": {"type": "LoadImage", "inputs": {"image": "broken.png"}},
        "5": {"type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "other"}},
    }}
    two["nodes"]["1"] = {"type": "LoadImage", "inputs": {"image": "photo.png"}}
    (project / "two.json").write_text(json.dumps(two))
    proc = kiln("run", "two.json", "--keep-going", cwd=project)
    assert proc.returncode == 1, proc.stderr
    saved = [Path(line) for line in proc.stdout.split()]
    assert len(saved) == 1 and saved[0].name.startswith("cli") and saved[0].is_file()
    assert "node 4 (LoadImage)" in proc.stderr and "broken.png" in proc.stderr
    assert "skipped, as they need its result: 5" in proc.stderr and "1 node(s) failed, 1 skipped" in proc.stderr
    events = [json.loads(line) for line in kiln("run", "two.json", "-k", "--json", cwd=project).stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds.count("node_failed") == 1 and kinds[-1] == "job_failed"
    assert events[-1]["blocked"] == ["5"] and [f["node_id"] for f in events[-1]["failures"]] == ["4"]


def test_image_flag_points_the_first_load_image_at_a_path(project: Path, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "blue.png"
    Image.new("RGB", (10, 10), (0, 0, 255)).save(other)
    proc = kiln("run", "resize.json", "--image", str(other), cwd=project, check=True)
    with Image.open(proc.stdout.split()[0]) as img:
        assert img.getpixel((3, 3))[:3] == (0, 0, 255)


def test_nodes_lists_schemas(project: Path):
    proc = kiln("nodes", "--json", cwd=project, check=True)
    schemas = json.loads(proc.stdout)
    assert {"LoadImage", "ImageResize", "SaveImage", "ImageGrid"} <= set(schemas)
    names = [line.split()[0] for line in kiln("nodes", cwd=project, check=True).stdout.splitlines() if line.strip()]
    assert names.count("LoadImage") == 1


def test_ctrl_c_interrupts_with_exit_130(project: Path):
    """A big grid keeps the job busy long enough for SIGINT to arrive mid-run."""
    Image.new("RGB", (2048, 2048), (9, 9, 9)).save(project / "input" / "huge.png")
    nodes = {"1": {"type": "LoadImage", "inputs": {"image": "huge.png"}}}
    previous = "1"
    for i in range(2, 40):  # a long chain of resizes: many node boundaries to stop at
        nodes[str(i)] = {"type": "ImageResize",
                         "inputs": {"image": [previous, 0], "width": 2048 - i, "height": 2048 - i, "mode": "stretch"}}
        previous = str(i)
    nodes["99"] = {"type": "SaveImage", "inputs": {"images": [previous, 0]}}
    (project / "long.json").write_text(json.dumps({"version": 1, "nodes": nodes}))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "long.json", "--json"], cwd=project,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until nodes are really running
        if json.loads(line)["type"] == "node_finished":
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    kinds = [json.loads(line)["type"] for line in out.splitlines()]
    assert kinds[-1] == "job_interrupted"
    assert not (project / "output").exists() or not any((project / "output").iterdir())


def test_an_invalid_run_is_reported_before_torch_is_imported(project: Path):
    """A script's typo costs a fraction of a second: the device (which needs torch) is found only for a valid job."""
    code = ("import sys; from engine.cli import main; "
            "rc = main(['run', 'resize.json', '--set', 'width=abc']); "
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.stdout.split() == ["2", "False"], proc.stderr


def test_a_spare_broken_node_is_noted_and_the_run_goes_on(project: Path):
    """A node no output needs does not run, so its problem is a note on stderr, not a refusal."""
    doc = json.loads(json.dumps(RESIZE))
    doc["nodes"]["9"] = {"type": "ImageResize", "inputs": {"image": ["1", 0], "width": 32, "mode": "nope"}}
    (project / "spare.json").write_text(json.dumps(doc))
    proc = kiln("validate", "spare.json", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["nodes"] == ["1", "2", "3"]
    assert {(e["node_id"], e["input_name"]) for e in report["ignored"]} >= {("9", "mode")}
    assert "note: not run" in proc.stderr and "node 9 (ImageResize)" in proc.stderr
    proc = kiln("run", "spare.json", cwd=project, check=True)
    assert len(proc.stdout.split()) == 1 and "node 9" in proc.stderr
    doc["nodes"]["3"]["inputs"]["images"] = ["9", 0]  # now an output needs it: refused, exit 2
    (project / "spare.json").write_text(json.dumps(doc))
    proc = kiln("run", "spare.json", cwd=project)
    assert proc.returncode == 2 and "node 9 (ImageResize)" in proc.stderr
    assert len(list((project / "output").iterdir())) == 1  # nothing more was saved


def test_validate_and_run_take_comfyui_editor_files(project: Path):
    """The same editor file the server and the editor accept: LoadImage -> ImageResize -> SaveImage
    saved by ComfyUI's editor (with the upload button's value), run headless; and a subgraph
    that contains itself is refused with exit 2 and the reason."""
    ui = {"version": 0.4, "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]], "nodes": [
        {"id": 1, "type": "LoadImage", "mode": 0, "widgets_values": ["photo.png", "image"],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}]},
        {"id": 2, "type": "ImageResize", "mode": 0, "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}], "widgets_values": [24, 16, "stretch"]},
        {"id": 3, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 2}],
         "widgets_values": ["editor"]}]}
    (project / "editor.json").write_text(json.dumps(ui))
    assert kiln("validate", "editor.json", cwd=project).returncode == 0
    proc = kiln("run", "editor.json", cwd=project, check=True)
    saved = Path(proc.stdout.split()[0])
    assert saved.name.startswith("editor_")
    with Image.open(saved) as img:
        assert img.size == (24, 16)
    sub = "dddddddd-0000-4000-8000-000000000000"
    ui["definitions"] = {"subgraphs": [{"id": sub, "name": "Loop", "nodes": [{"id": 1, "type": sub}], "links": []}]}
    ui["nodes"].append({"id": 4, "type": sub, "mode": 0})
    (project / "loop.json").write_text(json.dumps(ui))
    proc = kiln("validate", "loop.json", cwd=project)
    assert proc.returncode == 2 and "contains itself" in proc.stderr
