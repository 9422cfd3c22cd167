"""What of privsep goes into the container backend's sandbox image, and its digest.

The image (``packaging/container/build-image``) carries only what runs inside a sandbox: the
client SDK that user code imports and the small in-container entry code. Nothing trusted
(runner, server, secrets) and no configuration is copied in, so a sandbox cannot even read how
the supervisor works.

Both sides compute the same digest of those files: the build script stamps it on the image as
the label ``privsep.source``, and the backend compares it with its own files at start. An image
built from other sources (an older checkout, another version) would speak another protocol
version to the supervisor; it is refused with the command that rebuilds it, not run.

    python -m privsep.sandbox.image digest    # the digest of this installation's files
    python -m privsep.sandbox.image files     # the files, relative to the package's parent
    python -m privsep.sandbox.image tar       # those files as a tar stream (root-owned, 0644)
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path
from typing import IO

import privsep

IMAGE_NAME = "privsep-sandbox"
SOURCE_LABEL = "privsep.source"
BUILD_COMMAND = "packaging/container/build-image"
SITE_DIR = "/usr/lib/python3/dist-packages"
"""Where the image's python3 (Debian's) finds privsep and requests."""

_SANDBOX_FILES = (
    "__init__.py",
    "_incontainer.py",
    "_wire.py",
    "_steps.py",
    "_exit.py",
    "entrypoints.py",
)


def default_image() -> str:
    """``privsep-sandbox:<privsep version>``, the image ``sandbox.image`` names by default."""
    return f"{IMAGE_NAME}:{privsep.__version__}"


def package_parent() -> Path:
    """The directory that holds the ``privsep`` package (``src`` in a checkout)."""
    return Path(privsep.__file__).resolve().parent.parent


def source_files() -> list[str]:
    """The image's privsep files, relative to :func:`package_parent`, sorted."""
    parent = package_parent()
    pkg = parent / "privsep"
    # The client imports the token wrapper, which lives above every subpackage.
    files = [pkg / "__init__.py", pkg / "_token.py"]
    files += sorted((pkg / "client").glob("*.py"))
    files += [pkg / "sandbox" / name for name in _SANDBOX_FILES]
    return sorted(str(f.relative_to(parent)) for f in files)


def source_digest() -> str:
    """SHA-256 over every listed file's name and content (first 24 hex digits)."""
    parent = package_parent()
    h = hashlib.sha256()
    for name in source_files():
        data = (parent / name).read_bytes()
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:24]


def write_tar(out: IO[bytes]) -> None:
    """The listed files as a tar stream: root-owned, directories 0755, files 0644."""
    parent = package_parent()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        seen: set[str] = set()
        for name in source_files():
            parts = Path(name).parts
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in seen:
                    seen.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
            data = (parent / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) == 2 else ""
    if what == "digest":
        print(source_digest())
    elif what == "files":
        print("\n".join(source_files()))
    elif what == "tar":
        write_tar(sys.stdout.buffer)
        sys.stdout.flush()
    elif what == "default":
        print(default_image())
    else:
        print("usage: python -m privsep.sandbox.image digest|files|tar|default", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
