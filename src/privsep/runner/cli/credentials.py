"""``runner credentials create``: a new long-lived credential (an Ed25519 key pair) for a
supervisor or for the operator.

Only the public half ever leaves this host: it is printed for registration with the server.
"""

from __future__ import annotations

import errno
import os
import sys

from privsep.runner.errors import CommandError
from privsep.secrets.files import write_private_file
from privsep.secrets.keys import generate_ed25519_pem


def create_credential(out: str) -> int:
    """Write the private key to ``out`` (0600, in a 0700 directory) and ``out.pub``."""
    path = os.path.abspath(out)
    for existing in (path, path + ".pub"):
        if os.path.lexists(existing):
            raise CommandError(
                f"{existing} already exists; refusing to overwrite a credential "
                "(move it away first, or choose another --out)"
            )
    private_pem, public_pem = generate_ed25519_pem()
    try:
        write_private_file(path, private_pem, mode=0o600)
    except FileExistsError:
        raise CommandError(f"{path} already exists; refusing to overwrite a credential") from None
    except OSError as exc:
        hint = " (is the parent a file?)" if exc.errno == errno.ENOTDIR else ""
        raise CommandError(f"cannot write {path}: {exc.strerror}{hint}") from None
    fd = os.open(path + ".pub", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as pub:
        pub.write(public_pem)
    print(f"wrote private key {path} (mode 0600) and public key {path}.pub", file=sys.stderr)
    print(
        "register the public key on the server host: `runner supervisors register NAME "
        f"--public-key {path}.pub` for a supervisor, `runner operators register NAME "
        f"--public-key {path}.pub` for an operator:",
        file=sys.stderr,
    )
    sys.stdout.write(public_pem.decode("ascii"))
    return 0
