"""No secret in the repository, none in what we print, and TLS settings that fail early and clearly."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import requests

from worker.preflight import PreflightError, check_tls
from worker.settings import load_settings, redact_url

REPO = Path(__file__).resolve().parents[2]

#: Literal secrets: a private key, a Redis URL or --requirepass with a password that is not a
#: ${VARIABLE}, a masked *** or a <placeholder>.
SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a Redis URL": re.compile(r"rediss?://[^\s:/@\"']*:(?![$*{<])[^\s@\"']+@"),
    "literal requirepass": re.compile(r"requirepass[\"']?,?\s+[\"'](?!\$)|requirepass\s+(?![\"'$])[^\s,\])]+(?=\s|$)"),
    "literal DICOMweb password or token": re.compile(
        r"HER2_DICOMWEB_(?:PASSWORD|TOKEN)[:=]\s*[\"']?(?![$*{<])[^\s\"']+"
        r"|^\s*dicomweb_(?:password|token)\s*=\s*[\"'](?![$*{<])[^\"']+[\"']", re.MULTILINE),
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
    dicomweb = SECRET_PATTERNS["literal DICOMweb password or token"]
    assert dicomweb.search("HER2_DICOMWEB_PASSWORD: hunter2") and dicomweb.search("export HER2_DICOMWEB_TOKEN=abc")
    assert dicomweb.search('dicomweb_password = "hunter2"')
    assert not dicomweb.search("HER2_DICOMWEB_PASSWORD: ${ORTHANC_PASSWORD:?set ORTHANC_PASSWORD}")
    assert not dicomweb.search('HER2_DICOMWEB_PASSWORD="$(cat /run/secrets/pacs)"')
    assert not dicomweb.search('dicomweb_password: SecretStr = Field(SecretStr(""), description="...")')


def test_compose_remote_worker_shares_no_volume_and_gets_the_pacs_password_from_the_environment():
    compose = (REPO / "compose.yaml").read_text()
    remote = compose[compose.index("  worker-remote:"):compose.index("  worker-gpu:")]
    assert "her2-data" not in remote and 'profiles: ["remote"]' in remote
    assert "HER2_DICOMWEB_PASSWORD: ${ORTHANC_PASSWORD:?" in compose


def test_dicomweb_credentials_never_printed(capsys, monkeypatch):
    from dicom_io.dicomweb import DicomWebServer, describe
    from her2_cli.main import main

    monkeypatch.setenv("HER2_DICOMWEB_PASSWORD", "s3cret-pw")
    monkeypatch.setenv("HER2_DICOMWEB_TOKEN", "s3cret-token")
    settings = load_settings(dicomweb_url="https://pacs.example.org/dicom-web", dicomweb_username="her2")
    server = settings.dicomweb_server()
    assert (server.password, server.token) == ("s3cret-pw", "s3cret-token")  # reaches the client, and only it
    shown = [repr(settings), str(settings.model_dump()), settings.model_dump_json(), repr(server)]
    assert main(["config"]) == 0
    shown.append(capsys.readouterr().out)
    error = requests.HTTPError(response=_response(401, "https://her2:s3cret-pw@pacs.example.org/dicom-web/studies"))
    shown.append(str(describe(error, DicomWebServer("https://her2:s3cret-pw@pacs.example.org/dicom-web"), "reading")))
    assert shown[-1] == ("DICOMweb at https://pacs.example.org/dicom-web refused our credentials (HTTP 401 "
                         "Unauthorized) while reading")
    assert not [text for text in shown if "s3cret" in text]


def _response(status: int, url: str) -> requests.Response:
    response = requests.Response()
    response.status_code, response.reason, response.url = status, "Unauthorized", url
    return response


def test_dicomweb_session_sends_basic_credentials_or_a_bearer_token():
    from dicom_io.dicomweb import DicomWebServer, session

    request = requests.Request("GET", "https://pacs.example.org/dicom-web/studies")
    basic = session(DicomWebServer("https://pacs.example.org/dicom-web", "her2", "pw")).prepare_request(request)
    assert basic.headers["Authorization"] == "Basic aGVyMjpwdw=="  # her2:pw
    bearer = session(DicomWebServer("https://pacs.example.org/dicom-web", "her2", "pw", token="tok"))
    assert bearer.prepare_request(request).headers["Authorization"] == "Bearer tok"  # the token wins


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
