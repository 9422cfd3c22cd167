"""Small state records rewritten in place, so that per-sandbox bookkeeping costs no inode.

The supervisor keeps a record per running sandbox (:mod:`.orphans`) and per shipped log
(:mod:`.logship`), each rewritten a few times in the sandbox's life. Replacing a record
through a temporary file and ``rename`` creates and deletes an inode every time; under load
that churn was a large share of the supervisor's kernel time (on ext4 without a journal, the
inode allocator skips every recently deleted inode, one by one). A record far smaller than
a page, written at offset 0 by one ``pwrite``, is never torn by a kill: the write either
happened or did not. Nothing here is synced; a power cut loses the page cache, and whoever
reads a record copes with an old one or none.
"""

from __future__ import annotations

import os
from pathlib import Path

PAGE_BYTES = 4096


def rewrite_in_place(path: Path | str, data: bytes) -> None:
    """Write ``data`` over the start of ``path`` (created 0600 if missing, never through a
    symlink), padded with spaces to the file's old length: the readers parse JSON, which
    ignores trailing whitespace, and the file is never truncated, so there is no moment when
    it holds less than a whole record. Raises :class:`ValueError` for a record of a page or
    more (one write would no longer be untearable) and :class:`OSError` as ``open`` does."""
    if len(data) >= PAGE_BYTES:
        raise ValueError(f"a record rewritten in place must be under {PAGE_BYTES} bytes")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, data.ljust(os.fstat(fd).st_size), 0)
    finally:
        os.close(fd)


__all__ = ["PAGE_BYTES", "rewrite_in_place"]
