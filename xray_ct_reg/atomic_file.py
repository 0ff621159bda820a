"""Files that appear whole or not at all: write to a temporary file beside, then rename.

Checkpoints, training states, patient files, meshes and parameter files are read by later runs;
an interrupted or failed write must leave the previous file (or none), never half of a new one.
"""
import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def replaced_on_success(path):
    """Yield a temporary path beside ``path``; it replaces ``path`` when the block succeeds.

    The temporary file is hidden, named after this process and ends with ``path``'s name (so
    writers that pick a format by extension, e.g. Open3D, still do). When the block raises,
    the temporary file is removed and ``path`` is left as it was. Creates ``path``'s folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f'.partial-{os.getpid()}-{path.name}')
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with replaced_on_success(path) as temporary:
        temporary.write_bytes(data)


def write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    with replaced_on_success(path) as temporary:
        temporary.write_text(text)
