"""Uploaded files: checked names, a size limit, written only into a private temporary folder.

An upload reaches the server as a base64 ``data:`` URL (Dash's ``dcc.Upload``). Its name is refused when it
could point anywhere but a plain file in one folder (path separators, ``..``, a leading dot, control
characters, a drive letter); its size is refused above the limit before it is decoded. Accepted files are
written with mode 0600 into a fresh sub-folder of one ``mkdtemp`` folder that is removed when the server stops.
Files are only ever parsed as data (CIF, pattern, image): nothing uploaded is executed or imported.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import os
import re
import shutil
import tempfile
from pathlib import Path

from mmmat.io import InputError

#: Default upload limit in MB (10^6 bytes) per file.
DEFAULT_MAX_UPLOAD_MB = 20.0

_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.()+,=@ -]{0,199}$")


class UploadError(InputError):
    """An upload that is refused: unsafe name, too large, or not decodable. The message names it."""


def check_upload_name(name: str) -> str:
    r"""Return ``name`` when it is a safe plain file name, else raise :class:`UploadError`.

    Refused: empty names, anything with ``/`` or ``\\``, ``..``, a leading dot or space, a drive letter,
    control or non-ASCII-punctuation characters, and names longer than 200 characters.
    """
    if not isinstance(name, str) or not name:
        raise UploadError("upload has no file name")
    shown = name if len(name) <= 80 else name[:77] + "..."
    if "/" in name or "\\" in name or ".." in name or ":" in name or "\x00" in name:
        raise UploadError(f"refused file name {shown!r}: it must be a plain file name (no folders, no '..')")
    if not _NAME_OK.match(name) or name.strip() != name:
        raise UploadError(
            f"refused file name {shown!r}: use letters, digits and _.()+,=@- only, no leading dot, at most 200 "
            "characters"
        )
    return name


def decode_data_url(contents: str, name: str, max_bytes: int) -> bytes:
    """Decode a ``data:<type>;base64,<data>`` URL, refusing more than ``max_bytes`` before decoding."""
    if not isinstance(contents, str) or "," not in contents:
        raise UploadError(f"{name}: the upload is not a base64 data URL")
    head, data = contents.split(",", 1)
    if not head.endswith(";base64"):
        raise UploadError(f"{name}: the upload is not base64-encoded")
    approx = (len(data) * 3) // 4
    if approx > max_bytes + 3:
        raise UploadError(f"{name}: {approx / 1e6:.1f} MB is over the upload limit of {max_bytes / 1e6:.1f} MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UploadError(f"{name}: the upload is not valid base64 ({exc})") from None
    if len(raw) > max_bytes:
        raise UploadError(f"{name}: {len(raw) / 1e6:.1f} MB is over the upload limit of {max_bytes / 1e6:.1f} MB")
    return raw


class UploadStore:
    """A private temporary folder that holds the server's uploads (removed at exit).

    Args:
        max_bytes: Largest accepted file in bytes.
        root: Parent folder for the temporary folder (default: the system's temporary folder).

    """

    def __init__(self, max_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6), root: str | Path | None = None):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.root = Path(tempfile.mkdtemp(prefix="mmmat-serve-", dir=root)).resolve()
        os.chmod(self.root, 0o700)
        atexit.register(self.cleanup)

    def save(self, name: str, contents: str | bytes, suffixes: tuple[str, ...] | None = None) -> Path:
        """Check and write one upload; returns its path inside :attr:`root`.

        Args:
            name: The file name the browser sent.
            contents: A base64 ``data:`` URL (as ``dcc.Upload`` gives it) or raw bytes.
            suffixes: Accepted lower-case suffixes (``(".cif",)``); None accepts any.

        Raises:
            UploadError: Unsafe name, wrong suffix, over the size limit, or undecodable contents.

        """
        check_upload_name(name)
        if suffixes is not None and not name.lower().endswith(tuple(suffixes)):
            raise UploadError(f"{name}: expected one of {', '.join(suffixes)}")
        if isinstance(contents, bytes):
            if len(contents) > self.max_bytes:
                raise UploadError(
                    f"{name}: {len(contents) / 1e6:.1f} MB is over the upload limit of {self.max_bytes / 1e6:.1f} MB"
                )
            raw = contents
        else:
            raw = decode_data_url(contents, name, self.max_bytes)
        if not raw:
            raise UploadError(f"{name}: the file is empty")
        folder = Path(tempfile.mkdtemp(dir=self.root))
        path = (folder / name).resolve()
        if path.parent != folder.resolve() or self.root not in path.parents:
            raise UploadError(f"refused file name {name!r}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        return path

    def cleanup(self) -> None:
        """Remove the folder and every upload in it."""
        shutil.rmtree(self.root, ignore_errors=True)
