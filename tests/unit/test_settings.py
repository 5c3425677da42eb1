"""Settings: sources and their precedence, durations, validation errors that name the field, redaction, check-config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.auth.secrets import md5_password_hash
from proxy.settings import PoolMode, Settings, SslMode, load_settings, parse_duration, parse_upstream_url

ROOT = Path(__file__).resolve().parents[2]
FILE_PASSWORD = "file-pw-1a2b"
ENV_PASSWORD = "env-pw-3c4d"


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PGMUX_* from the outer environment, and no ./pgmux.toml picked up by accident."""
    for name in list(os.environ):
        if name.upper().startswith("PGMUX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _toml(tmp_path: Path, text: str, name: str = "pgmux.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _field_errors(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    return {".".join(str(part) for part in error["loc"]): error["msg"] for error in exc.value.errors()}


UPSTREAM = f"postgresql://app:{FILE_PASSWORD}@db.internal:5432/app"


# ---- precedence ------------------------------------------------------------------------------------

def test_defaults_apply_when_no_source_sets_a_value(tmp_path: Path) -> None:
    settings = load_settings(_toml(tmp_path, f'upstream_url = "{UPSTREAM}"\n'), [])
    assert isinstance(settings, Settings)
    assert settings.default_pool_size == 20
    assert settings.pool_mode is PoolMode.TRANSACTION
    assert settings.query_wait_timeout == 120.0
    assert settings.server_reset_query == "DISCARD ALL"
    [listener] = settings.all_listeners()
    assert listener.address == "127.0.0.1:6432"


def test_cli_flag_beats_env_beats_toml_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(tmp_path, f'upstream_url = "{UPSTREAM}"\ndefault_pool_size = 3\n'
                             'min_pool_size = 1\nmax_client_conn = 50\n')
    monkeypatch.setenv("PGMUX_DEFAULT_POOL_SIZE", "4")
    monkeypatch.setenv("PGMUX_MIN_POOL_SIZE", "2")
    settings = load_settings(config, ["--default-pool-size", "5"])
    assert settings.default_pool_size == 5  # CLI over env and file
    assert settings.min_pool_size == 2  # env over file
    assert settings.max_client_conn == 50  # file over default
    assert settings.reserve_pool_size == 0  # default


def test_each_level_wins_over_the_ones_below_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(tmp_path, f'upstream_url = "{UPSTREAM}"\nquery_wait_timeout = "10s"\n')
    assert load_settings(config, []).query_wait_timeout == 10.0
    monkeypatch.setenv("PGMUX_QUERY_WAIT_TIMEOUT", "20s")
    assert load_settings(config, []).query_wait_timeout == 20.0
    assert load_settings(config, ["--query-wait-timeout", "30s"]).query_wait_timeout == 30.0
    # Keyword overrides (what tests and the demo pass) sit between the CLI and the environment.
    assert load_settings(config, [], query_wait_timeout=40).query_wait_timeout == 40.0
    assert load_settings(config, ["--query-wait-timeout", "30s"], query_wait_timeout=40).query_wait_timeout == 30.0


def test_env_alone_is_a_complete_sidecar_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGMUX_UPSTREAM_URL", f"postgresql://app:{ENV_PASSWORD}@db:5432/shop?sslmode=require")
    monkeypatch.setenv("PGMUX_LISTEN", "0.0.0.0:6432")
    settings = load_settings(None, [])
    assert list(settings.all_databases()) == ["shop"]
    [listener] = settings.all_listeners()
    assert listener.address == "0.0.0.0:6432"
    assert listener.pool_mode is PoolMode.TRANSACTION


def test_env_upstream_url_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(tmp_path, f'upstream_url = "{UPSTREAM}"\n')
    monkeypatch.setenv("PGMUX_UPSTREAM_URL", f"postgresql://app:{ENV_PASSWORD}@other:6000/app")
    upstream = parse_upstream_url(load_settings(config, []).upstream_url.get_secret_value())
    assert (upstream.host, upstream.port, upstream.password) == ("other", 6000, ENV_PASSWORD)


def test_pgmux_toml_in_the_working_directory_is_read_by_default(tmp_path: Path) -> None:
    _toml(tmp_path, f'upstream_url = "{UPSTREAM}"\ndefault_pool_size = 7\n')
    assert load_settings(None, []).default_pool_size == 7


def test_nested_env_with_double_underscore_adds_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _toml(tmp_path, f'upstream_url = "{UPSTREAM}"\n[users.alice]\npassword = "alice-file"\n')
    monkeypatch.setenv("PGMUX_USERS__BOB__PASSWORD", "bob-env")
    users = load_settings(config, []).users
    assert users["alice"].password.get_secret_value() == "alice-file"
    assert users["bob"].password.get_secret_value() == "bob-env"


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_settings(tmp_path / "nope.toml", [])


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(_toml(tmp_path, f'upstream_url = "{UPSTREAM}"\n'), [])
    with pytest.raises(ValidationError):
        settings.default_pool_size = 1  # type: ignore[misc]


# ---- durations --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("30", 30.0), ("0", 0.0),
    (" 5s ", 5.0), (7, 7.0), (2.5, 2.5), (0, 0.0),
])
def test_durations_accept_units_and_plain_seconds(tmp_path: Path, text, seconds: float) -> None:
    value = f'"{text}"' if isinstance(text, str) else str(text)
    config = _toml(tmp_path, f'upstream_url = "{UPSTREAM}"\nquery_wait_timeout = {value}\n'
                             f'server_idle_timeout = {value}\n')
    settings = load_settings(config, [])
    assert settings.query_wait_timeout == pytest.approx(seconds)
    assert settings.server_idle_timeout == pytest.approx(seconds)
    assert load_settings(None, [], upstream_url=UPSTREAM, client_login_timeout=text).client_login_timeout \
        == pytest.approx(seconds)


def test_durations_from_env_and_cli_use_the_same_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGMUX_UPSTREAM_URL", UPSTREAM)
    monkeypatch.setenv("PGMUX_SERVER_LIFETIME", "2m")
    settings = load_settings(None, ["--reserve-pool-timeout", "250ms"])
    assert settings.server_lifetime == 120.0
    assert settings.reserve_pool_timeout == 0.25


@pytest.mark.parametrize("bad", ["5 minutes", "1d", "ms", "", "-1", "five", -1, -0.5])
def test_invalid_duration_names_the_field(bad) -> None:
    with pytest.raises(ValidationError) as exc:
        load_settings(None, [], upstream_url=UPSTREAM, query_wait_timeout=bad)
    errors = _field_errors(exc)
    assert list(errors) == ["query_wait_timeout"], errors


def test_parse_duration_is_the_unit_table() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2m") == 120
    assert parse_duration(3) == 3
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("3 weeks")


# ---- validation errors name the field ------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "field"), [
    ({"pool_mode": "bogus"}, "pool_mode"),
    ({"auth_type": "kerberos"}, "auth_type"),
    ({"default_pool_size": 0}, "default_pool_size"),
    ({"max_client_conn": "lots"}, "max_client_conn"),
    ({"min_pool_size": -1}, "min_pool_size"),
    ({"listen": "6432"}, "listen"),
    ({"listen": "127.0.0.1:99999"}, "listen"),
    ({"log_format": "xml"}, "log_format"),
    ({"default_pool_sizee": 3}, "default_pool_sizee"),
    ({"listeners": [{"address": "nope"}]}, "listeners.0.address"),
    ({"listeners": [{"address": "127.0.0.1:1", "pool_mode": "statement"}]}, "listeners.0.pool_mode"),
    ({"databases": {"x": {"url": "postgresql://x@h/x", "pool_size": -2}}}, "databases.x.pool_size"),
    ({"databases": {"x": {"url": "postgresql://x@h/x", "poolsize": 2}}}, "databases.x.poolsize"),
    ({"databases": {"x": {"url": "postgresql://x@h/x?sslmode=sometimes"}}}, "databases.x.url"),
    ({"databases": {"x": {"url": "mysql://x@h/x"}}}, "databases.x.url"),
])
def test_invalid_value_names_the_field(overrides: dict, field: str) -> None:
    overrides.setdefault("upstream_url", UPSTREAM)
    with pytest.raises(ValidationError) as exc:
        load_settings(None, [], **overrides)
    assert field in _field_errors(exc), _field_errors(exc)


@pytest.mark.parametrize(("url", "complaint"), [
    ("http://app:pw@h/app", "postgresql://"),
    ("postgresql://h/app", "user"),
    ("postgresql://app:pw@h/app?sslmode=sometimes", "sslmode"),
    ("postgresql://app:pw@h/app?connect_timeout=3", "connect_timeout"),
    ("postgresql://app:pw@h:port/app", "port"),
])
def test_invalid_upstream_url_names_the_field_and_the_problem(url: str, complaint: str) -> None:
    with pytest.raises(ValidationError) as exc:
        load_settings(None, [], upstream_url=url)
    errors = _field_errors(exc)
    assert list(errors) == ["upstream_url"], errors
    assert complaint in errors["upstream_url"]


def test_bad_user_secret_names_the_user() -> None:
    with pytest.raises(ValidationError, match=r"users\.alice\.password"):
        load_settings(None, [], upstream_url=UPSTREAM, users={"alice": {"password": ""}})
    with pytest.raises(ValidationError, match=r"users\.bob\.password"):
        load_settings(None, [], upstream_url=UPSTREAM, users={"bob": {"password": "SCRAM-SHA-256$4096:xx$yy:zz"}})


def test_missing_upstream_says_how_to_give_one() -> None:
    with pytest.raises(ValidationError, match="upstream_url"):
        load_settings(None, [])


def test_upstream_url_database_may_not_also_be_a_databases_section() -> None:
    with pytest.raises(ValidationError, match=r"databases\.app"):
        load_settings(None, [], upstream_url=UPSTREAM, databases={"app": {"url": UPSTREAM}})


def test_two_listeners_on_one_address_are_refused() -> None:
    with pytest.raises(ValidationError, match="share an address"):
        load_settings(None, [], upstream_url=UPSTREAM, listeners=[
            {"address": "127.0.0.1:6432"}, {"address": "127.0.0.1:6432", "pool_mode": "session"}])


@pytest.mark.parametrize("url", ["postgresql://a:S3CRET@h/d?sslmode=no", "postgresql://a:S3CRET@h:x/d"])
def test_validation_error_text_does_not_echo_the_upstream_password(url: str) -> None:
    # What a traceback or a log line shows for a bad upstream_url: the field, the problem, not the password.
    with pytest.raises(ValidationError) as exc:
        load_settings(None, [], upstream_url=url)
    assert "upstream_url" in str(exc.value)
    assert "S3CRET" not in str(exc.value)


# ---- several databases and listeners ----------------------------------------------------------

MULTI = """
default_pool_size = 20
query_wait_timeout = "30s"

[databases.app]
url = "postgresql://app:secret-a@db.internal:5432/app?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem"
pool_size = 10

[databases.reports]
url = "postgresql://reporter:secret-r@replica.internal:5433/app"
max_db_connections = 4

[[listeners]]
address = "0.0.0.0:6432"
pool_mode = "transaction"

[[listeners]]
address = "0.0.0.0:5432"
pool_mode = "session"
auth_type = "md5"

[users.alice]
password = "plain-alice"

[users.bob]
password = "MD5HASH"
"""


def test_several_databases_and_listeners_from_toml(tmp_path: Path) -> None:
    text = MULTI.replace("MD5HASH", md5_password_hash("bob", "bob-pw"))
    settings = load_settings(_toml(tmp_path, text), [])
    databases = settings.all_databases()
    assert sorted(databases) == ["app", "reports"]
    assert databases["app"].pool_size == 10
    assert databases["reports"].pool_size is None
    assert databases["reports"].max_db_connections == 4
    app = parse_upstream_url(databases["app"].url.get_secret_value())
    assert (app.host, app.port, app.user, app.password) == ("db.internal", 5432, "app", "secret-a")
    assert app.sslmode is SslMode.VERIFY_FULL and app.sslrootcert == "/etc/ssl/db-ca.pem"
    reports = parse_upstream_url(databases["reports"].url.get_secret_value())
    assert (reports.host, reports.port, reports.user, reports.database) == ("replica.internal", 5433, "reporter", "app")
    assert reports.sslmode is SslMode.PREFER
    listeners = settings.all_listeners()
    assert [(item.address, item.pool_mode, item.auth_type.value) for item in listeners] == [
        ("0.0.0.0:6432", PoolMode.TRANSACTION, "scram-sha-256"),
        ("0.0.0.0:5432", PoolMode.SESSION, "md5"),
    ]
    assert sorted(settings.users) == ["alice", "bob"]


def test_upstream_url_shorthand_adds_a_database_next_to_the_sections() -> None:
    settings = load_settings(None, [], upstream_url="postgresql://app:pw@h/main",
                             databases={"other": {"url": "postgresql://o:pw@h2/other"}},
                             listen="127.0.0.1:7000", pool_mode="session", auth_type="md5",
                             listeners=[{"address": "127.0.0.1:7001"}])
    assert sorted(settings.all_databases()) == ["main", "other"]
    listeners = settings.all_listeners()
    # The shorthand listener comes first and carries the top-level pool_mode and auth_type.
    assert [(item.address, item.pool_mode.value, item.auth_type.value) for item in listeners] == [
        ("127.0.0.1:7000", "session", "md5"), ("127.0.0.1:7001", "transaction", "scram-sha-256")]


def test_upstream_url_forms_parse_like_libpq() -> None:
    upstream = parse_upstream_url("postgres://us%40er:p%40ss%2Fw@db.example:6543/my%20db?sslmode=require")
    assert (upstream.user, upstream.password, upstream.host, upstream.port, upstream.database) == (
        "us@er", "p@ss/w", "db.example", 6543, "my db")
    assert upstream.sslmode is SslMode.REQUIRE
    # Defaults: port 5432, database = user, sslmode=prefer (libpq's default).
    bare = parse_upstream_url("postgresql://alice@db")
    assert (bare.port, bare.database, bare.password, bare.sslmode) == (5432, "alice", None, SslMode.PREFER)
    # Query parameters override the authority part, as in libpq.
    socket = parse_upstream_url("postgresql:///app?host=/var/run/postgresql&user=app&password=pw&port=5433")
    assert socket.unix_socket == "/var/run/postgresql/.s.PGSQL.5433"
    assert (socket.user, socket.password) == ("app", "pw")


# ---- redaction ------------------------------------------------------------------------------------

def test_redacted_hides_every_password(tmp_path: Path) -> None:
    verifier = "SCRAM-SHA-256$4096:" + "c2FsdHNhbHRzYWx0c2FsdA==" + "$" + "A" * 43 + "=:" + "B" * 43 + "="
    text = MULTI.replace("MD5HASH", md5_password_hash("bob", "bob-pw")) + f'[users.carol]\npassword = "{verifier}"\n'
    settings = load_settings(_toml(tmp_path, text), [],
                             upstream_url="postgresql://main:main-secret@h/main?password=query-secret")
    data = settings.redacted()
    dumped = json.dumps(data)
    for secret in ("secret-a", "secret-r", "main-secret", "query-secret", "plain-alice",
                   md5_password_hash("bob", "bob-pw"), verifier, "c2FsdHNhbHRz"):
        assert secret not in dumped, secret
    assert data["databases"]["app"]["url"].startswith("postgresql://app:***@db.internal:5432/app")
    assert data["upstream_url"].startswith("postgresql://main:***@h:5432/main")
    assert data["users"] == {"alice": {"password": "***"}, "bob": {"password": "***"}, "carol": {"password": "***"}}
    # Everything that is not a secret is shown as it is.
    assert data["databases"]["app"]["pool_size"] == 10
    assert data["query_wait_timeout"] == 30.0
    assert [item["pool_mode"] for item in data["listeners"]] == ["transaction", "session"]
    # The settings' own repr hides them too.
    for secret in ("secret-a", "main-secret", "plain-alice"):
        assert secret not in repr(settings)


def test_redacted_ipv6_upstream_keeps_its_brackets() -> None:
    # The redacted form is what clients and logs see; "::1:5433" would not say where the port starts.
    upstream = parse_upstream_url("postgresql://app:pw@[::1]:5433/app")
    assert upstream.host == "::1"
    assert "@[::1]:5433/app" in upstream.redacted()


def test_redacted_url_without_password_shows_no_placeholder() -> None:
    settings = load_settings(None, [], upstream_url="postgresql://app@h/app")
    assert settings.redacted()["upstream_url"].startswith("postgresql://app@h:5432/app")


# ---- pgmux check-config ------------------------------------------------------------------------

def _check_config(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("PGMUX_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), clean.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "proxy", "check-config", *args], cwd=tmp_path,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60)


def test_check_config_prints_redacted_json_and_exits_0(tmp_path: Path) -> None:
    config = _toml(tmp_path, MULTI.replace("MD5HASH", md5_password_hash("bob", "bob-pw")), name="multi.toml")
    result = _check_config(tmp_path, "--config", str(config), "--default-pool-size", "9",
                           env={"PGMUX_QUERY_WAIT_TIMEOUT": "250ms"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["default_pool_size"] == 9
    assert data["query_wait_timeout"] == 0.25
    assert sorted(data["databases"]) == ["app", "reports"]
    output = result.stdout + result.stderr
    for secret in ("secret-a", "secret-r", "plain-alice", md5_password_hash("bob", "bob-pw")):
        assert secret not in output


def test_check_config_reads_the_env_only_sidecar_config(tmp_path: Path) -> None:
    result = _check_config(tmp_path, env={"PGMUX_UPSTREAM_URL": f"postgresql://app:{ENV_PASSWORD}@db/app",
                                          "PGMUX_LISTEN": "0.0.0.0:6432"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["upstream_url"].startswith("postgresql://app:***@db:5432/app")
    assert data["listen"] == "0.0.0.0:6432"
    assert ENV_PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(("toml", "field"), [
    (f'upstream_url = "{UPSTREAM}"\npool_mode = "bogus"\n', "pool_mode"),
    ('default_pool_size = 3\n', "upstream_url"),
    (f'upstream_url = "{UPSTREAM}"\nquery_wait_timeout = "soon"\n', "query_wait_timeout"),
    (f'upstream_url = "{UPSTREAM}"\n[[listeners]]\naddress = "nowhere"\n', "listeners.0.address"),
    (f'upstream_url = "{UPSTREAM}"\n[databases.x]\nurl = "postgresql://x:pw@h/x"\nsize = 3\n', "databases.x.size"),
])
def test_check_config_exits_nonzero_naming_the_field(tmp_path: Path, toml: str, field: str) -> None:
    result = _check_config(tmp_path, "--config", str(_toml(tmp_path, toml, name="bad.toml")))
    assert result.returncode != 0
    assert field in result.stderr, result.stderr
    assert result.stdout == ""
    assert FILE_PASSWORD not in result.stdout + result.stderr


def test_check_config_of_a_missing_file_exits_nonzero(tmp_path: Path) -> None:
    result = _check_config(tmp_path, "--config", str(tmp_path / "absent.toml"))
    assert result.returncode != 0
    assert "absent.toml" in result.stderr


def test_check_config_error_never_shows_part_of_a_password(tmp_path: Path) -> None:
    # A generated password with '/' (base64) pasted into a URL without percent-encoding: the URL is
    # malformed, and the complaint must not quote any part of the password while saying so.
    password = "Xy7pQ/2k9+secret"
    config = _toml(tmp_path, f'upstream_url = "postgresql://app:{password}@db.internal/app"\n', name="slash.toml")
    result = _check_config(tmp_path, "--config", str(config))
    assert result.returncode != 0
    assert "upstream_url" in result.stderr
    for part in password.split("/"):
        assert part not in result.stderr, result.stderr


def test_a_plaintext_http_listener_off_loopback_is_refused_unless_allowed_explicitly() -> None:
    upstream = "postgresql://app:pw@127.0.0.1:5432/app"
    with pytest.raises(ValidationError, match="allow_plaintext_http"):
        Settings(upstream_url=upstream, listeners=[{"address": "0.0.0.0:8080", "protocol": "http"}])
    Settings(upstream_url=upstream, listeners=[{"address": "0.0.0.0:8080", "protocol": "http",
                                                "allow_plaintext_http": True}])
    Settings(upstream_url=upstream, listeners=[{"address": "127.0.0.1:8080", "protocol": "http"},
                                               {"address": "[::1]:8081", "protocol": "http"},
                                               {"address": "localhost:8082", "protocol": "http"}])
    with_tls = Settings(upstream_url=upstream, listeners=[{"address": "0.0.0.0:8443", "protocol": "http",
                                                           "client_tls_sslmode": "require"}])
    assert with_tls.all_listeners()[0].protocol == "http"
    assert Settings(upstream_url=upstream).all_listeners()[0].protocol == "postgres"
    assert int(with_tls.http_max_request_size) == 10 * 1024 * 1024
