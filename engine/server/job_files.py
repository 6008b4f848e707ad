"""Files that travel with a cluster job: inputs out to the worker, results back to the server.

A remote worker has its own disk. The server ships the input files a job names
(any literal that names a file in its input folder) with the job, and the worker
sends back every file a node reports in its UI output (``{"filename",
"subfolder", "type": "output" | "temp"}``), which the server writes into its own
folders. ``/view``, history and the editor therefore work exactly as with the
in-process worker, and the outputs need not be shared between machines.

Names: the worker's name is kept when it is free on the server; otherwise its
last number counts on past every taken one (``kiln_00001_.png`` ->
``kiln_00007_.png``). A retried attempt (its first worker died) reuses the names
the lost attempt was given, overwriting them, so a job never saves a file twice;
what a lost attempt wrote and the final one did not is removed at the end.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

from engine.paths import PathRefused, SafeRoot, atomic_write, split_annotation

#: UI file entries of these types are files the server must hold.
FILE_TYPES = ("output", "temp")
#: The most bytes of input files one job may carry to a worker.
MAX_INPUT_BYTES = 512 * 1024 * 1024

_LAST_NUMBER = re.compile(r"^(.*?)(\d+)(\D*)$")


def file_refs(ui: Any) -> Iterator[dict[str, Any]]:
    """The UI entries of ``ui`` that name an output or temp file."""
    if not isinstance(ui, dict):
        return
    for value in ui.values():
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and isinstance(item.get("filename"), str) \
                        and item.get("type") in FILE_TYPES:
                    yield item


def free_name(folder: Path, name: str) -> str:
    """``name`` if no file in ``folder`` has it, else a name counted past every taken one."""
    if not (folder / name).exists():
        return name
    m = _LAST_NUMBER.match(name)
    if m:
        prefix, digits, rest = m.groups()
        width = len(digits)
    else:
        path = Path(name)
        prefix, digits, rest, width = path.stem + "_", "0", path.suffix, 1
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(rest) + "$")
    highest = int(digits)
    for entry in os.scandir(folder):
        found = pattern.match(entry.name)
        if found:
            highest = max(highest, int(found.group(1)))
    return f"{prefix}{highest + 1:0{width}d}{rest}"


class JobFiles:
    """One job's returned files on the server, across its attempts."""

    def __init__(self, roots: dict[str, SafeRoot]) -> None:
        self.roots = roots
        #: (type, subfolder, worker's name) -> the server's name
        self._names: dict[tuple[str, str, str], str] = {}
        self._this_attempt: set[tuple[str, str, str]] = set()

    def new_attempt(self) -> None:
        self._this_attempt = set()

    def place(self, item: dict[str, Any]) -> None:
        """Write a returned file and rename ``item`` (a UI entry, with its bytes in "data") in place."""
        data = item.pop("data", None)
        kind, subfolder, name = item["type"], item.get("subfolder") or "", item["filename"]
        key = (kind, subfolder, name)
        server_name = self._names.get(key)
        if data is None:  # nothing came (the worker lost the file): keep the name it had
            if server_name:
                item["filename"] = server_name
            return
        folder = self.roots[kind].resolve(".", subfolder) if subfolder else self.roots[kind].root
        if subfolder:
            folder.mkdir(parents=True, exist_ok=True)
        if server_name is None:
            existing = folder / name
            if existing.is_file() and _same_content(existing, data):
                server_name = name  # the same file (a cached node re-reporting it): not a second copy
            else:
                server_name = free_name(folder, name)
            self._names[key] = server_name
        target = self.roots[kind].resolve(server_name, subfolder)
        if not (target.is_file() and _same_content(target, data)):
            atomic_write(target, data)
        self._this_attempt.add(key)
        item["filename"] = server_name

    def rename(self, ui: Any) -> None:
        """Give the UI entries of ``ui`` their server names (a final outcome's outputs)."""
        for item in file_refs(ui):
            server_name = self._names.get((item["type"], item.get("subfolder") or "", item["filename"]))
            if server_name:
                item["filename"] = server_name

    def drop_lost_attempts(self) -> list[str]:
        """Remove files written by lost attempts that the final attempt did not write again."""
        removed = []
        for key, server_name in self._names.items():
            if key in self._this_attempt:
                continue
            kind, subfolder, _ = key
            try:
                path = self.roots[kind].resolve(server_name, subfolder)
                path.unlink()
                removed.append(server_name)
            except (FileNotFoundError, PathRefused):
                pass
        return removed


def _same_content(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    except OSError:
        return False


def input_files(nodes: dict[str, dict[str, Any]], input_root: SafeRoot) -> list[dict[str, Any]]:
    """The files of the input folder that a workflow's literal inputs name, with their bytes.

    ``nodes`` is a Kiln-format workflow's node table. Any literal string that
    names an existing file inside the input folder is taken (LoadImage, masks,
    third-party loaders alike); links and other values are left alone.
    """
    files: dict[str, bytes] = {}
    total = 0
    for node in nodes.values():
        for value in (node.get("inputs") or {}).values():
            if not isinstance(value, str) or not value:
                continue
            value, kind = split_annotation(value, "input")  # ComfyUI's "clipspace/m.png [input]"
            if kind != "input" or value in files:
                continue
            try:
                path = input_root.resolve(value, must_exist=True)
            except (PathRefused, FileNotFoundError, OSError):
                continue
            size = path.stat().st_size
            total += size
            if total > MAX_INPUT_BYTES:
                raise ValueError(f"the job's input files exceed {MAX_INPUT_BYTES} bytes")
            files[value] = path.read_bytes()
    return [{"name": name, "data": data} for name, data in files.items()]
