"""Connection-string masking parsed the way libpq parses it: no form libpq accepts (or refuses) shows its
password, in check-config's output or in any command's error."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from exporter.dsn import mask_dsn, problem, redact

SECRET = "S3cretPw"


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:S3cretPw@h/db", "postgresql://u:***@h/db"),
        ("postgresql://:S3cretPw@host/db", "postgresql://:***@host/db"),
        ("postgres://u:S3cretPw@h:5432/db?sslmode=require", "postgres://u:***@h:5432/db?sslmode=require"),
        ("postgresql://u:S3%2FcretPw@h/db", "postgresql://u:***@h/db"),
        ("postgresql://h/db?user=u&password=S3cretPw", "postgresql://h/db?user=u&password=***"),
        ("postgresql://h/db?pass%77ord=S3cretPw", "postgresql://h/db?pass%77ord=***"),
        ("postgresql://u:S3cret%zzPw@h/db", "postgresql://u:***@h/db"),
        ("host=h password=S3cretPw dbname=db", "host=h password=*** dbname=db"),
        ("host=h password = S3cretPw dbname=db", "host=h password = *** dbname=db"),
        ("host=h password   =S3cretPw", "host=h password   =***"),
        ("host=h password='S3cret Pw' dbname=db", "host=h password=*** dbname=db"),
        (r"host=h password='S3\'cretPw'", "host=h password=***"),
        ("host=h sslpassword=S3cretPw", "host=h sslpassword=***"),
        ("host=h PASSWORD=S3cretPw", "host=h PASSWORD=***"),
        ("host=h S3cretPw", "host=h ***"),
        ("host=h password='S3cretPw", "host=h ***"),
        ("postgresql:///db?host=/tmp", "postgresql:///db?host=/tmp"),
    ],
)
def test_every_password_form_is_masked(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked
    assert "S3" not in mask_dsn(dsn)


@pytest.mark.parametrize(
    "dsn",
    [
        "host=h password = S3cretPw dbname=db",
        "postgresql://:S3cretPw@host/db",
        "host=h password='S3cret Pw' dbname=db",
        "postgresql://h/db?pass%77ord=S3cretPw",
    ],
)
def test_masking_agrees_with_libpq_about_what_the_password_is(dsn: str) -> None:
    """The value libpq itself reads as the password is exactly what redact() hides."""
    password = psycopg.conninfo.conninfo_to_dict(dsn)["password"]
    assert isinstance(password, str)
    assert redact(f"auth failed for {password}", dsn) == "auth failed for ***"


def test_libpq_errors_about_a_malformed_string_never_quote_the_password() -> None:
    dsn = "postgresql://u:S3cret%zzPw@h/db"
    with pytest.raises(psycopg.ProgrammingError, match="S3cret"):
        psycopg.conninfo.conninfo_to_dict(dsn)  # what libpq says unfiltered
    reason = problem(dsn)
    assert reason == 'invalid percent-encoded token: "***"'
    assert problem("host=h S3cretPw") == 'missing "=" after "***" in connection info string'
    assert problem("host=h password = X") is None


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("dsn", ["host=127.0.0.1 password = S3cretPw", "postgresql://:S3cretPw@127.0.0.1/db"])
def test_check_config_prints_no_password(dsn: str) -> None:
    done = _cli(
        "check-config", "receiver", env={"DATABASE_URL": dsn, "WEBHOOK_ALLOW_UNAUTHENTICATED": "true"}
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "***" in done.stdout


@pytest.mark.parametrize(
    "command", [("check-config", "exporter"), ("migrate",), ("receiver",), ("exporter",)]
)
def test_a_malformed_url_is_a_config_error_that_never_echoes_the_password(command: tuple[str, ...]) -> None:
    done = _cli(
        *command,
        env={
            "DATABASE_URL": "postgresql://u:S3cret%zzPw@127.0.0.1/db",
            "WEBHOOK_ALLOW_UNAUTHENTICATED": "true",
        },
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "S3cret" not in done.stdout + done.stderr
    assert "DATABASE_URL: not a valid connection string: invalid percent-encoded token" in done.stderr


def test_migrate_against_an_unreachable_server_fails_in_one_line_without_the_password() -> None:
    done = _cli("migrate", env={"DATABASE_URL": "postgresql://u:S3cretPw@127.0.0.1:1/db"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # libpq's hint ("Is the server running...") on the same line
    assert lines[0].startswith("dict-rate-limit migrate: connection failed: ")
    assert "Is the server running" in lines[0]  # libpq's second line, folded in, not dropped
    assert "S3cretPw" not in done.stderr
