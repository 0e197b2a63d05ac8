"""File-mode helper for atomic writes.

``tempfile.mkstemp`` / ``mkdtemp`` create private files (0600) and folders (0700); a file
renamed into place keeps that mode, so outputs written through a temp sibling would be
unreadable to the user's group and others whatever their umask says. :func:`created_mode`
is the mode ``open()`` / ``mkdir()`` would have given: 0666 / 0777 minus the umask.
"""

from __future__ import annotations

import os

__all__ = ["created_mode"]


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide and not thread-safe)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def created_mode(directory: bool = False) -> int:
    """``0o777`` (folders) or ``0o666`` (files) without the process umask's bits."""
    return (0o777 if directory else 0o666) & ~_umask()
