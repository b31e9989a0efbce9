"""Writing files so that a crash never leaves half of one behind.

Every file the package writes (downloads, jsonl splits, adapter files, weight caches, predictions,
the notebooks' results store) goes through ``atomic_path``: the bytes go to a temporary file in the
same folder, which is renamed over the destination only once it is complete. ``os.replace`` is atomic
on one file system, so a reader sees the old file, the complete new one, or nothing -- never a
truncated download or a half-written jsonl after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """A temporary path next to ``dest`` to write to; renamed to ``dest`` when the block succeeds.

    For libraries that write to a path themselves (``safetensors.torch.save_file``). On any error,
    KeyboardInterrupt included, the temporary file is deleted and ``dest`` is left as it was.
    The result is an ordinary data file (mode 0644), not the 0600 that temporary files get.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(dest: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """``open(dest, mode)`` for writing (text as UTF-8), made atomic with ``atomic_path``."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(dest) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line (UTF-8, no ``\\u`` escapes), atomically and byte-for-byte repeatable."""
    path = Path(path)
    with atomic_write(path) as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_json(data: Any, path: str | Path) -> Path:
    """``data`` as indented JSON, atomically."""
    path = Path(path)
    with atomic_write(path) as out:
        out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def write_text(text: str, path: str | Path) -> Path:
    """``text`` as a UTF-8 file, atomically."""
    path = Path(path)
    with atomic_write(path) as out:
        out.write(text)
    return path
