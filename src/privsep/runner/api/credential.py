"""Loading a long-lived Ed25519 credential, with one line that says how to fix each failure.

The supervisor and the operator commands both hold one; the errors are mapped here, at the
load, so that a missing file elsewhere is never reported as a missing credential.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from privsep.runner.errors import CommandError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def load_credential(path: str, *, role: str, missing_hint: str) -> Ed25519PrivateKey:
    """The ``role`` ("supervisor", "operator") key at ``path``, or a :class:`CommandError`."""
    from privsep.secrets.files import InsecureFileError
    from privsep.secrets.keys import KeyFormatError, load_private_key

    try:
        return load_private_key(path)
    except FileNotFoundError:
        raise CommandError(f"no {role} credential at {path}: {missing_hint}") from None
    except InsecureFileError as exc:
        raise CommandError(f"refusing to use the {role} credential: {exc}") from None
    except KeyFormatError as exc:
        raise CommandError(f"unusable {role} credential {exc}") from None
    except OSError as exc:
        raise CommandError(
            f"cannot read the {role} credential {path}: {exc.strerror or exc}"
        ) from None
