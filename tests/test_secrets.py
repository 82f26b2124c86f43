"""No secret in the repository, none in what we print, and TLS settings that fail early and clearly."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from worker.preflight import PreflightError, check_tls
from worker.settings import load_settings, redact_url

REPO = Path(__file__).resolve().parents[1]

#: Literal secrets: a private key, a Redis URL or --requirepass with a password that is not a
#: ${VARIABLE}, a masked *** or a <placeholder>.
SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a Redis URL": re.compile(r"rediss?://[^\s:/@\"']*:(?![$*{<])[^\s@\"']+@"),
    "literal requirepass": re.compile(r"requirepass[\"']?,?\s+[\"'](?!\$)|requirepass\s+(?![\"'$])[^\s,\])]+(?=\s|$)"),
}
#: This file, whose examples must match the patterns.
SELF = Path(__file__).resolve()


def tracked_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file under the repo
        return [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts]
    return [REPO / n for n in names.decode().split("\0") if n]


def test_no_secret_is_committed():
    found = []
    for path in tracked_files():
        if path.suffix in {".onnx", ".dcm", ".png"} or path.resolve() == SELF or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        found += [f"{path.relative_to(REPO)}: {what}" for what, pattern in SECRET_PATTERNS.items()
                  if pattern.search(text)]
    assert found == []


def test_secret_patterns_catch_what_they_should():
    assert SECRET_PATTERNS["password in a Redis URL"].search("redis://:hunter2@redis:6379/0")
    assert not SECRET_PATTERNS["password in a Redis URL"].search("redis://:${REDIS_PASSWORD:?set}@redis:6379/0")
    assert not SECRET_PATTERNS["password in a Redis URL"].search("redis://:$REDIS_PASSWORD@127.0.0.1:6379/0")
    assert SECRET_PATTERNS["literal requirepass"].search('"--requirepass", "hunter2"')
    assert not SECRET_PATTERNS["literal requirepass"].search('"--requirepass", "${REDIS_PASSWORD:?set}"')
    assert not SECRET_PATTERNS["literal requirepass"].search('--requirepass "$REDIS_PASSWORD"')
    assert not SECRET_PATTERNS["literal requirepass"].search('auth = ["--requirepass", password]')
    assert SECRET_PATTERNS["literal requirepass"].search("redis-server --requirepass hunter2 --port 6379")


def test_compose_redis_requires_the_password_from_the_environment():
    compose = (REPO / "compose.yaml").read_text()
    assert re.search(r'"--requirepass", "\$\{REDIS_PASSWORD:\?[^}]*\}"', compose)
    urls = re.findall(r"HER2_(?:BROKER_URL|RESULT_BACKEND|STATE_REDIS_URL): (\S+)", compose)
    assert len(urls) == 3 and all(u.startswith("redis://:${REDIS_PASSWORD:?") for u in urls)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://user:s3cret@[::1]:6380/1", "rediss://user:***@[::1]:6380/1"),
    ("redis://127.0.0.1:6379/2", "redis://127.0.0.1:6379/2"),
])
def test_redact_url_hides_only_the_password(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize(("settings", "message"), [
    ({"listen_tls": True}, "listen_tls needs tls_cert_file and tls_key_file"),
    ({"listen_tls": True, "tls_cert_file": "a.crt", "tls_key_file": "a.key"},
     "tls_require_client_cert needs tls_ca_file"),
    ({"listen_tls": True, "tls_cert_file": "missing.crt", "tls_key_file": "missing.key",
      "tls_require_client_cert": False}, "cannot load TLS certificate/key/CA"),
    ({"destination_tls": True, "tls_ca_file": "missing-ca.pem"}, "cannot load TLS CA file"),
    ({"destination_tls": True, "tls_cert_file": "a.crt"}, "tls_cert_file and tls_key_file must be set together"),
])
def test_incomplete_tls_settings_fail_at_start_in_one_line(settings, message):
    with pytest.raises(PreflightError, match=message) as raised:
        check_tls(load_settings(**settings))
    assert "\n" not in str(raised.value)


def test_tls_is_off_by_default():
    check_tls(load_settings())  # plain TCP both ways: nothing to load, nothing raised
