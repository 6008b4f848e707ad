"""The one path resolver every file access goes through.

Every name that arrives from outside (a `/view` query, an upload, a LoadImage
input, a workflow or model name) is resolved against a :class:`SafeRoot`. A name
is refused when it is absolute, contains ``..``, or resolves (after following
symlinks) to a real path outside the root. ComfyUI's repeated path-traversal bugs
came from checks spread over routes; here there is one.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable
from urllib.parse import unquote


#: ComfyUI's folder annotations: ``"photo.png [output]"`` names a file of that folder.
FOLDER_TYPES = ("output", "input", "temp")


def split_annotation(filename: str, default: str) -> tuple[str, str]:
    """ComfyUI's ``"name.png [input]"`` form: (name, folder type); the annotation overrides ``default``.

    ComfyUI's mask editor writes LoadImage values this way
    (``"clipspace/clipspace-mask-1.png [input]"``), and ``/view`` accepts it too.
    """
    for kind in FOLDER_TYPES:
        suffix = f" [{kind}]"
        if filename.endswith(suffix):
            return filename[: -len(suffix)], kind
    return filename, default


class PathRefused(ValueError):
    """A name that would leave its root, or that is not a plain relative name."""


class PathMalformed(PathRefused):
    """A name no file system could hold (too long, too deep, NUL, not text): bad input,
    told apart from an escape attempt so that servers answer 400 rather than 403."""


#: Longest file or folder name, in bytes, that Linux, macOS and Windows file systems
#: all store; a longer one fails with ENAMETOOLONG deep inside whatever opens it.
NAME_MAX_BYTES = 255
#: Deepest folder nesting a name may ask for: enough for any real layout, and far
#: below PATH_MAX, so "a/a/a/..." thousands deep is refused here and not by the OS.
MAX_DEPTH = 32


def _decodings(name: str, rounds: int = 3) -> list[str]:
    """``name`` and its successive percent-decodings (``%252e`` -> ``%2e`` -> ``.``)."""
    forms = [name]
    while len(forms) <= rounds and "%" in forms[-1]:
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one file from another at the same path: a replaced file (a new inode, or an
    inode number reused) differs here, since creating or relinking a file sets its ctime."""
    return (st.st_dev, st.st_ino, st.st_ctime_ns, stat.S_IFMT(st.st_mode))


class SafeRoot:
    def __init__(self, root: str | Path, create: bool = False) -> None:
        root = Path(root)
        if create:
            root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        #: (name, subfolder) -> (real path, the candidate path, identity of the file it led to).
        self._known: dict[tuple[str, str], tuple[Path, str, tuple[int, int, int, int]]] = {}

    #: Names remembered per root before the memory is emptied (a server checks the same few names per job).
    KNOWN_MAX = 4096

    def __repr__(self) -> str:
        return f"SafeRoot({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    @staticmethod
    def _parts(name: str) -> list[str]:
        if not isinstance(name, str):
            raise PathMalformed("a file name must be a string")
        if "\x00" in name:
            raise PathMalformed("a file name may not contain NUL")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise PathMalformed("a file name must be valid text (it holds a lone UTF-16 surrogate)") from None
        # A name that still carries percent-escapes may be decoded again further on
        # (a client, a proxy, a later join); judge every decoding of it, not just this one.
        for form in _decodings(name):
            form = form.replace("\\", "/")
            if form.startswith("/") or PurePosixPath(form).is_absolute() or (len(form) > 1 and form[1] == ":"):
                raise PathRefused(f"absolute paths are not allowed: {name!r}")
            if any(p == ".." for p in form.split("/")):
                raise PathRefused(f"'..' is not allowed in a file name: {name!r}")
            if "\x00" in form:
                raise PathRefused("a file name may not contain NUL")
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        for part in parts:
            if len(part.encode("utf-8")) > NAME_MAX_BYTES:
                raise PathMalformed(f"a file or folder name is longer than {NAME_MAX_BYTES} bytes: {part[:40]!r}...")
        return parts

    def resolve(self, name: str, subfolder: str = "", *, must_exist: bool = False) -> Path:
        """The real path of ``subfolder/name`` inside the root, or :class:`PathRefused`.

        A name resolved before is answered from memory when one ``stat`` of the same
        candidate path shows the very file it led to then (device, inode, ctime and
        kind): following symlinks (a ``realpath``, one ``lstat`` per component) is what
        a server re-checking a queued job's files would otherwise pay on every check.
        Any difference (the file replaced, gone, a folder swapped for a symlink that
        leads elsewhere) resolves the name again with every check, so nothing that
        would be refused is answered from memory, and what is answered is a path
        that passed the checks.
        """
        key = (name, subfolder or "") if isinstance(name, str) and isinstance(subfolder or "", str) else None
        known = self._known.get(key) if key is not None else None
        if known is not None:
            real, candidate, identity = known
            try:
                st = os.stat(candidate)
            except (OSError, ValueError):
                st = None
            if st is not None and _identity(st) == identity and (not must_exist or stat.S_ISREG(st.st_mode)):
                return real
            self._known.pop(key, None)
        parts = self._parts(subfolder or "") + self._parts(name)
        if not parts:
            raise PathMalformed("empty file name")
        if len(parts) > MAX_DEPTH + 1:
            raise PathMalformed(f"folders may nest at most {MAX_DEPTH} deep; this name has {len(parts) - 1}")
        candidate = self.root.joinpath(*parts)
        real = Path(os.path.realpath(candidate))
        if real != self.root and self.root not in real.parents:
            raise PathRefused(f"{name!r} leads outside its folder")
        try:
            st = os.stat(real)
        except OSError:
            st = None
        if must_exist and (st is None or not stat.S_ISREG(st.st_mode)):
            raise FileNotFoundError(f"no such file: {'/'.join(parts)}")
        if st is not None and key is not None:
            if len(self._known) >= self.KNOWN_MAX:
                self._known.clear()
            self._known[key] = (real, str(candidate), _identity(st))
        return real

    def relative(self, path: Path) -> str:
        """The name, relative to the root in POSIX form, by which ``path`` is known."""
        return Path(os.path.realpath(path)).relative_to(self.root).as_posix()

    def list(self, extensions: Iterable[str] | None = None) -> list[str]:
        """Files under the root (recursively) as relative POSIX names, sorted.

        Symlinks that lead outside the root are left out, so a listing never
        advertises a name that :meth:`resolve` would refuse.
        """
        exts = tuple(e.lower() for e in extensions) if extensions else None
        names = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in filenames:
                if filename.startswith(".") or (exts and not filename.lower().endswith(exts)):
                    continue
                rel = Path(dirpath, filename).relative_to(self.root).as_posix()
                try:
                    self.resolve(rel, must_exist=True)
                except (PathRefused, FileNotFoundError):
                    continue
                names.append(rel)
        return sorted(names)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a part.

    A temporary file in the same folder is written, synced and renamed over the
    target; readable by all (0644, not mkstemp's 0600) like every other file Kiln
    writes, so saved files are not unlike shipped ones.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kiln-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
