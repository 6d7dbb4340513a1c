from pathlib import Path

import pydantic
import pytest

from sluice_common.errors import ConfigError
from sluice_common.settings import ServerUrls, load_settings, server_urls


def test_defaults_match_the_documented_values() -> None:
    s = load_settings({})
    assert s.database_url is None
    assert s.redis_url is None
    assert s.data_dir == Path(".sluice")
    assert s.api_bind == "127.0.0.1:8000"
    assert (s.concurrency, s.rate_limit_per_minute, s.max_attempts) == (10, 100, 3)


def test_reads_each_variable() -> None:
    s = load_settings(
        {
            "DATABASE_URL": "postgresql://u@db:5432/x",
            "REDIS_URL": "redis://cache:6379/1",
            "SLUICE_DATA_DIR": "/var/lib/sluice",
            "SLUICE_API_BIND": "0.0.0.0:9000",
            "SLUICE_CONCURRENCY": "20",
            "SLUICE_RATE_LIMIT_PER_MINUTE": "200",
            "SLUICE_MAX_ATTEMPTS": "5",
            "SLUICE_LOG_LEVEL": "debug",
        }
    )
    assert s.database_url == "postgresql://u@db:5432/x"
    assert s.redis_url == "redis://cache:6379/1"
    assert s.data_path == Path("/var/lib/sluice")
    assert s.api_bind == "0.0.0.0:9000"
    assert (s.concurrency, s.rate_limit_per_minute, s.max_attempts) == (20, 200, 5)
    assert s.log_level == "DEBUG"


def test_empty_urls_mean_embedded() -> None:
    s = load_settings({"DATABASE_URL": "", "REDIS_URL": ""})
    assert s.database_url is None
    assert s.redis_url is None


def test_services_take_the_urls_as_set() -> None:
    s = load_settings({"DATABASE_URL": "postgresql://u@db/x", "REDIS_URL": "redis://cache/1"})
    assert server_urls(s) == ServerUrls("postgresql://u@db/x", "redis://cache/1")
    without_redis = load_settings({"DATABASE_URL": "postgresql://u@db/x"})
    assert server_urls(without_redis, need_redis=False) == ServerUrls("postgresql://u@db/x", "")


def test_a_service_without_its_urls_names_them() -> None:
    with pytest.raises(ConfigError, match=r"^DATABASE_URL and REDIS_URL are not set"):
        server_urls(load_settings({}))
    with pytest.raises(ConfigError, match=r"^REDIS_URL is not set"):
        server_urls(load_settings({"DATABASE_URL": "postgresql://u@db/x"}))
    with pytest.raises(ConfigError, match=r"^DATABASE_URL is not set"):
        server_urls(load_settings({"REDIS_URL": "redis://cache/1"}), need_redis=False)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SLUICE_CONCURRENCY", "lots"),
        ("SLUICE_CONCURRENCY", "0"),
        ("SLUICE_RATE_LIMIT_PER_MINUTE", "-1"),
        ("SLUICE_MAX_ATTEMPTS", "1.5"),
        ("SLUICE_API_BIND", "8000"),
        ("SLUICE_API_BIND", "host:99999"),
        ("DATABASE_URL", "mysql://x"),
        ("REDIS_URL", "http://x"),
        ("SLUICE_LOG_LEVEL", "LOUD"),
        ("SLUICE_LOG_FORMAT", "xml"),
        ("SLUICE_LOG_FORMAT", ""),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert name in str(info.value)
    assert repr(value) in str(info.value)


def test_log_format_is_text_unless_json_is_asked_for() -> None:
    assert load_settings({}).log_format == "text"
    assert load_settings({"SLUICE_LOG_FORMAT": "json"}).log_format == "json"
    assert load_settings({"SLUICE_LOG_FORMAT": " JSON "}).log_format == "json"
    with pytest.raises(ConfigError, match=r"SLUICE_LOG_FORMAT: .*must be text or json \(got 'logfmt'\)"):
        load_settings({"SLUICE_LOG_FORMAT": "logfmt"})


def test_the_alert_webhook_is_off_unless_set_and_takes_http_urls() -> None:
    s = load_settings({})
    assert (s.alert_webhook_url, s.alert_interval_seconds) == (None, 15.0)
    assert load_settings({"SLUICE_ALERT_WEBHOOK_URL": ""}).alert_webhook_url is None
    for url in ("https://hooks.example.com/sluice?token=abc", "http://alertmanager:9093/api/v2/x", "http://[::1]:80/"):
        assert load_settings({"SLUICE_ALERT_WEBHOOK_URL": url}).alert_webhook_url == url
    assert load_settings({"SLUICE_ALERT_INTERVAL_SECONDS": "30"}).alert_interval_seconds == 30


@pytest.mark.parametrize(
    "url", ["hooks.example.com/sluice", "ftp://example.com/x", "https://", "http://host:port/x", "http://h:0/"]
)
def test_a_bad_alert_webhook_url_is_refused_without_being_echoed(url: str) -> None:
    with pytest.raises(ConfigError, match=r"SLUICE_ALERT_WEBHOOK_URL: .*must be an http:// or https:// URL") as info:
        load_settings({"SLUICE_ALERT_WEBHOOK_URL": url})
    # Such URLs often carry a token: the message and the settings' repr do not show them.
    assert repr(url) not in str(info.value)
    assert "value hidden" in str(info.value)
    assert "secret" not in repr(load_settings({"SLUICE_ALERT_WEBHOOK_URL": "https://h.example/secret"}))


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"SLUICE_CONCURRENCY": "x", "SLUICE_MAX_ATTEMPTS": "y"})
    assert "SLUICE_CONCURRENCY" in str(info.value)
    assert "SLUICE_MAX_ATTEMPTS" in str(info.value)


def test_settings_are_frozen() -> None:
    s = load_settings({})
    with pytest.raises(pydantic.ValidationError):
        s.concurrency = 99  # type: ignore[misc]


def test_process_environment_is_read_when_no_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_CONCURRENCY", "7")
    assert load_settings().concurrency == 7
