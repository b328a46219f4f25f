"""service.settings_check: settings errors in the operator's names; unknown DDPM_* variables warned about,
Kubernetes' service links not."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings
from service.settings_check import explain, unknown_variables, unreachable_bounds

FIELDS = set(Settings.model_fields)


def test_an_error_names_the_variable_and_the_flag_and_the_value() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(max_batch=0, request_timeout_s="soon")  # type: ignore[arg-type]
    assert explain(caught.value).splitlines() == [
        "DDPM_MAX_BATCH / --max-batch: Input should be greater than or equal to 1 (got 0)",
        "DDPM_REQUEST_TIMEOUT_S / --request-timeout-s: Input should be a valid number, unable to parse string as a number (got 'soon')",
    ]


@pytest.mark.parametrize("name", sorted(n for n, f in Settings.model_fields.items() if f.annotation in (float, float | None)))
def test_no_float_setting_takes_inf(name: str) -> None:
    """inf passed every bound: DDPM_RESPONSE_CACHE_MB=inf stopped the start (OverflowError), DDPM_DEFAULT_DEADLINE_S=inf
    made every answer a 500 (its JSON echo), DDPM_DRAIN_TIMEOUT_S=inf drained with no bound."""
    with pytest.raises(ValidationError) as caught:
        Settings(**{name: "inf"})
    assert explain(caught.value) == f"DDPM_{name.upper()} / --{name.replace('_', '-')}: Input should be a finite number (got 'inf')"


def test_values_from_an_env_file_with_windows_line_ends_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every value of an env file saved with CRLF ends in a CR: DDPM_LOG_FORMAT was refused ("got 'text\\r'") and
    DDPM_MODEL was "model directory not found: /models/x\\r (set ...", a line the CR drew over itself."""
    from service.client import _token

    values = {"DDPM_MODEL": "/models/x\r", "DDPM_LOG_FORMAT": "text\r", "DDPM_MAX_BATCH": " 16\r", "DDPM_PRECISION": "fp32\r",
              "DDPM_SCHEDULING": "request\r\n", "DDPM_API_TOKEN": "secret\r"}  # fmt: skip
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.model, s.log_format, s.max_batch, s.precision, s.scheduling) == ("/models/x", "text", 16, "fp32", "request")
    assert s.api_token is not None and s.api_token.get_secret_value() == "secret" and _token(None) == "secret"  # the client's
    assert Settings(model=" /models/y ").model == "/models/y"  # a flag alike
    from commands.main import build_parser  # the commands' own defaults from the environment

    flag_defaults = {"DDPM_URL": "http://h:1\r", "DDPM_LOG_LEVEL": "warning\r", "DDPM_COMPILE": "off\r", "DDPM_PRECISION": "bf16\r"}
    for name, value in flag_defaults.items():
        monkeypatch.setenv(name, value)
    parser = build_parser()
    assert parser.parse_args(["generate"]).url == "http://h:1" and parser.parse_args(["serve"]).log_level == "warning"
    sample = parser.parse_args(["sample"])
    assert (sample.compile, sample.precision) == ("off", "bf16")


def test_threads_are_bounded() -> None:
    """DDPM_THREADS=100000 started 100,000 OpenMP threads: the server segfaulted (exit 139) and the machine ran out of
    processes ("fork: Resource temporarily unavailable" in the shell beside it)."""
    with pytest.raises(ValidationError) as caught:
        Settings(threads=100000)
    assert explain(caught.value) == "DDPM_THREADS / --threads: Input should be less than or equal to 1024 (got 100000)"


@pytest.mark.parametrize(("name", "warning"), [
    ("DDPM_MAX_BACH", "DDPM_MAX_BACH is not a setting and is ignored: did you mean DDPM_MAX_BATCH?"),
    ("DDPM_REQUEST_TIMEOUT", "DDPM_REQUEST_TIMEOUT is not a setting and is ignored: did you mean DDPM_REQUEST_TIMEOUT_S?"),
    ("DDPM_LOGLEVEL", "DDPM_LOGLEVEL is not a setting and is ignored: did you mean DDPM_LOG_LEVEL?"),
    ("DDPM_WORKERS", "DDPM_WORKERS is not a setting and is ignored (ddpm serve --help lists them)"),
])  # fmt: skip
def test_a_variable_that_is_no_setting_is_warned_about(name: str, warning: str) -> None:
    assert unknown_variables({name: "1", "PATH": "/bin"}, FIELDS) == [warning]


def test_settings_the_projects_other_variables_and_kubernetes_service_links_are_not() -> None:
    # what Kubernetes injects for a Service "ddpm-serve" (port 80, named http) and one named "ddpm"
    links = ["DDPM_SERVE_SERVICE_HOST", "DDPM_SERVE_SERVICE_PORT", "DDPM_SERVE_SERVICE_PORT_HTTP", "DDPM_SERVE_PORT",
             "DDPM_SERVE_PORT_80_TCP", "DDPM_SERVE_PORT_80_TCP_PROTO", "DDPM_SERVE_PORT_80_TCP_PORT", "DDPM_SERVE_PORT_80_TCP_ADDR",
             "DDPM_PORT", "DDPM_SERVICE_HOST", "DDPM_PORT_8000_TCP"]  # fmt: skip
    ours = ["DDPM_MAX_BATCH", "DDPM_API_TOKEN_FILE", "DDPM_LOG_LEVEL", "DDPM_URL", "DDPM_REQUIRE_BROWSER", "NOT_DDPM_X"]
    assert unknown_variables(dict.fromkeys(links + ours, "x"), FIELDS) == []


def test_a_per_request_bound_over_the_queue_or_a_clients_quota_is_warned_about() -> None:
    assert unreachable_bounds(Settings()) == []  # the defaults fit: 64 images a request, a queue of 1024, 256 a client
    assert unreachable_bounds(Settings(max_images_per_request=128, max_images_per_client=64, max_calls_per_client=1000)) == [
        "DDPM_MAX_IMAGES_PER_REQUEST=128 is over DDPM_MAX_IMAGES_PER_CLIENT=64: requests between the two are refused (422)",
        "DDPM_MAX_CALLS_PER_REQUEST=65536 is over DDPM_MAX_CALLS_PER_CLIENT=1000: requests between the two are refused (422)",
    ]


def test_priority_bounds_out_of_order_are_refused_naming_both() -> None:
    """A floor over the ceiling inverted the clamp silently: every request ran at DDPM_MAX_PRIORITY."""
    for fields, said in (({"min_priority": 5, "max_priority": 1}, "DDPM_MIN_PRIORITY (5) is over DDPM_MAX_PRIORITY (1)"),
                         ({"min_priority_anonymous": 20}, "DDPM_MIN_PRIORITY_ANONYMOUS (20) is over DDPM_MAX_PRIORITY (10)")):  # fmt: skip
        with pytest.raises(ValidationError) as caught:
            Settings(**fields)  # type: ignore[arg-type]
        assert explain(caught.value) == said
    assert Settings(min_priority=-3, min_priority_anonymous=10, max_priority=10).max_priority == 10  # equal is in order
