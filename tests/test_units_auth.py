"""tcprelay.auth on its own: the answer, its check, and where the secret comes from.

No sockets: each test runs in milliseconds.
"""

import hashlib
import hmac
import logging
import os
import stat

import pytest

from tcprelay import auth

SECRET = b"correct horse"
NONCE = bytes(range(32))


def test_the_answer_is_hex_hmac_sha256_over_the_context_and_the_nonce():
    expected = hmac.new(SECRET, b"tcprelay registration v1\x00" + NONCE,
                        hashlib.sha256).hexdigest()
    assert auth.answer(SECRET, NONCE) == expected
    assert auth.METHOD == "hmac-sha256"


def test_check_takes_the_answer_to_this_nonce_only():
    good = auth.answer(SECRET, NONCE)
    assert auth.check(SECRET, NONCE, good)
    assert not auth.check(SECRET, NONCE[::-1], good)            # another nonce
    assert not auth.check(b"other", NONCE, good)                # another secret
    assert not auth.check(SECRET, NONCE, good.upper())
    assert not auth.check(SECRET, NONCE, good[:-1])
    assert not auth.check(SECRET, NONCE, good + "0")


@pytest.mark.parametrize("given", [None, 7, ["x"], b"bytes", "\u00e9" * 64, ""])
def test_check_refuses_what_is_not_a_hex_string_without_raising(given):
    assert auth.check(SECRET, NONCE, given) is False


def test_nonces_are_fresh_and_32_bytes():
    nonces = {auth.new_nonce() for _ in range(100)}
    assert len(nonces) == 100 and {len(n) for n in nonces} == {auth.NONCE_BYTES} == {32}


def _secret_file(tmp_path, content, mode=stat.S_IRUSR | stat.S_IWUSR):
    path = tmp_path / "secret"
    path.write_bytes(content)
    os.chmod(str(path), mode)
    return str(path)


def test_a_secret_file_is_read_without_surrounding_whitespace(tmp_path, caplog):
    path = _secret_file(tmp_path, b"  s3cret\n")
    assert auth.load_secret(path, environ={auth.SECRET_ENV: "ignored"}) == b"s3cret"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_secret_file_others_can_read_is_used_with_a_warning(tmp_path, caplog):
    path = _secret_file(tmp_path, b"s3cret", stat.S_IRUSR | stat.S_IWUSR | stat.S_IROTH)
    with caplog.at_level(logging.WARNING, logger="tcprelay.auth"):
        assert auth.load_secret(path, environ={}) == b"s3cret"
    assert [r.getMessage() for r in caplog.records] == [
        "the secret file %s can be read by other users; chmod 600 it" % path]


def test_an_empty_or_missing_secret_file_is_an_error(tmp_path):
    with pytest.raises(auth.SecretError, match="is empty"):
        auth.load_secret(_secret_file(tmp_path, b" \n"), environ={})
    with pytest.raises(auth.SecretError, match="cannot read the secret file"):
        auth.load_secret(str(tmp_path / "absent"), environ={})


def test_the_environment_gives_the_secret_when_no_file_does():
    assert auth.load_secret(environ={auth.SECRET_ENV: " s3cret \n"}) == b"s3cret"
    assert auth.load_secret(environ={}) is None
    with pytest.raises(auth.SecretError, match="set but empty"):
        auth.load_secret(environ={auth.SECRET_ENV: "  "})
