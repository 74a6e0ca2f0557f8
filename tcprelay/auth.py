"""Shared-secret authentication for registrations.

Challenge-response on the registration stream (docs/PROTOCOL.md, 2.6): the
relay sends a fresh random nonce, the service answers with
HMAC-SHA256(secret, CONTEXT + nonce), the relay compares in constant time.
The secret never crosses the wire, and an answer is good for one nonce only,
so a recorded exchange cannot be replayed.
"""

import hashlib
import hmac
import logging
import os
import secrets
import stat

log = logging.getLogger(__name__)

METHOD = "hmac-sha256"
CONTEXT = b"tcprelay registration v1\x00"   # binds the answer to this use of the secret
GROUP_CONTEXT = b"tcprelay group v1\x00"    # ... and a group key's answer to its group
NONCE_BYTES = 32
SECRET_ENV = "TCPRELAY_SECRET"


class SecretError(Exception):
    """The secret could not be read, or is unusable."""


def load_secret(path=None, environ=None):
    """The secret from ``path`` (a file), else from $TCPRELAY_SECRET, else None.

    Surrounding whitespace (a trailing newline) is not part of the secret.
    """
    environ = os.environ if environ is None else environ
    if path is not None:
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise SecretError("cannot read the secret file %s: %s" % (path, exc.strerror or exc))
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("the secret file %s can be read by other users; chmod 600 it", path)
        if not secret:
            raise SecretError("the secret file %s is empty" % path)
        return secret
    value = environ.get(SECRET_ENV)
    if value is None:
        return None
    secret = value.strip().encode("utf-8")
    if not secret:
        raise SecretError("$%s is set but empty" % SECRET_ENV)
    return secret


def new_nonce():
    return secrets.token_bytes(NONCE_BYTES)


def answer(secret, nonce):
    """The service's answer to ``nonce``: hex HMAC-SHA256."""
    return hmac.new(secret, CONTEXT + nonce, hashlib.sha256).hexdigest()


def check(secret, nonce, given):
    """True if ``given`` (a hex string from the service) answers ``nonce``."""
    return _matches(answer(secret, nonce), given)


def group_answer(key, nonce, group):
    """A group member's answer to ``nonce`` for ``group`` (its name, text): hex
    HMAC-SHA256 keyed by the group's ``key`` (bytes) of GROUP_CONTEXT, the nonce
    and the name in UTF-8, so that an answer for one group proves nothing for another."""
    return hmac.new(key, GROUP_CONTEXT + nonce + group.encode("utf-8"),
                    hashlib.sha256).hexdigest()


def check_group(key, nonce, group, given):
    """True if ``given`` (a hex string from the service) answers ``nonce`` for ``group``."""
    return _matches(group_answer(key, nonce, group), given)


def _matches(expected, given):
    """Constant-time comparison of our hex ``expected`` with the peer's ``given``."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii", "replace"))
