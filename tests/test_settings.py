"""Settings from the environment: defaults, casting, and every mistake reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.backends import Backend
from gateway.settings import VARIABLES, Settings, SettingsError, help_text

ONE = {"GATEWAY_BACKENDS": "http://10.0.0.5:8000"}


def problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as raised:
        Settings.from_environ(environ)
    return raised.value.problems


def test_defaults_apply_when_only_backends_are_set() -> None:
    settings = Settings.from_environ(ONE)
    assert settings.backends == (Backend("http://10.0.0.5:8000"),)
    assert settings.pinned == {}
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.health_interval_s == 5.0
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.log_level == "info"
    assert settings.workers == 1


def test_backends_are_normalised_and_deduplicated() -> None:
    settings = Settings.from_environ(
        {
            "GATEWAY_BACKENDS": " http://h1:8000/ , http://h2:8001,http://h1:8000,, https://h3/prefix/"
        }
    )
    assert [b.url for b in settings.backends] == [
        "http://h1:8000",
        "http://h2:8001",
        "https://h3/prefix",
    ]


def test_ipv6_backend_keeps_its_brackets() -> None:
    settings = Settings.from_environ({"GATEWAY_BACKENDS": "http://[::1]:8000"})
    assert settings.backends[0].url == "http://[::1]:8000"
    assert str(settings.backends[0].endpoint("/health")) == "http://[::1]:8000/health"


def test_pinned_routes_parse_with_replicas() -> None:
    settings = Settings.from_environ(
        {"GATEWAY_MODELS": "model-a=http://h1:8000|http://h2:8000; model-b=http://h3:8000"}
    )
    assert settings.backends == ()
    assert settings.pinned == {
        "model-a": (Backend("http://h1:8000"), Backend("http://h2:8000")),
        "model-b": (Backend("http://h3:8000"),),
    }
    assert [b.url for b in settings.all_backends] == [
        "http://h1:8000",
        "http://h2:8000",
        "http://h3:8000",
    ]


def test_every_bad_variable_is_named_in_one_error() -> None:
    found = problems(
        {
            "GATEWAY_BACKENDS": "http://ok:1,ftp://nope",
            "GATEWAY_PORT": "80a",
            "GATEWAY_HEALTH_INTERVAL_S": "-1",
            "GATEWAY_HEALTH_FALL": "0",
            "GATEWAY_LOG_LEVEL": "loud",
            "GATEWAY_IDLE_TIMEOUT_S": "nan",
            "GATEWAY_MAX_BODY_BYTE": "1",
        }
    )
    names = [problem.split("=")[0].split(":")[0] for problem in found]
    assert sorted(names) == [
        "GATEWAY_BACKENDS",
        "GATEWAY_HEALTH_FALL",
        "GATEWAY_HEALTH_INTERVAL_S",
        "GATEWAY_IDLE_TIMEOUT_S",
        "GATEWAY_LOG_LEVEL",
        "GATEWAY_MAX_BODY_BYTE",
        "GATEWAY_PORT",
    ]
    assert any("unknown variable" in problem for problem in found)


def test_no_backend_says_what_to_set() -> None:
    (problem,) = problems({})
    assert "GATEWAY_BACKENDS" in problem and "no backend configured" in problem


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("http://h:8000/v1", "without /v1"),
        ("h:8000", "http:// or https://"),
        ("http://h:8000?x=1", "no query"),
        ("http://user:pw@h:8000", "credentials"),
        ("http://h:99999", "not a URL"),
    ],
)
def test_malformed_backend_urls_are_explained(raw: str, fragment: str) -> None:
    (problem,) = problems({"GATEWAY_BACKENDS": raw})
    assert problem.startswith("GATEWAY_BACKENDS=") and fragment in problem


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("model-a", "MODEL=URL"),
        ("=http://h:1", "MODEL=URL"),
        ("a=", "no backend"),
        ("a=http://h:1;a=http://h:2", "listed twice"),
    ],
)
def test_malformed_model_routes_are_explained(raw: str, fragment: str) -> None:
    (problem,) = problems({"GATEWAY_MODELS": raw, **ONE})
    assert problem.startswith("GATEWAY_MODELS=") and fragment in problem


@pytest.mark.parametrize(("raw", "fragment"), [("0", "at least 1"), ("two", "whole number")])
def test_workers_must_be_a_positive_whole_number(raw: str, fragment: str) -> None:
    (problem,) = problems({"GATEWAY_WORKERS": raw, **ONE})
    assert problem.startswith(f"GATEWAY_WORKERS={raw!r}") and fragment in problem


def test_workers_parse() -> None:
    assert Settings.from_environ({"GATEWAY_WORKERS": " 4 ", **ONE}).workers == 4


def test_server_is_hypercorn_unless_uvicorn_is_chosen() -> None:
    assert Settings.from_environ(ONE).server == "hypercorn"
    assert Settings.from_environ({"GATEWAY_SERVER": " Uvicorn ", **ONE}).server == "uvicorn"


def test_an_unknown_server_is_refused_naming_the_choices() -> None:
    (problem,) = problems({"GATEWAY_SERVER": "granian", **ONE})
    assert problem.startswith("GATEWAY_SERVER='granian'") and "hypercorn, uvicorn" in problem


def test_help_lists_every_variable_with_its_default() -> None:
    text = help_text()
    for variable in VARIABLES:
        assert variable.name in text
    assert "[default: 8080]" in text
    assert {f.name for f in VARIABLES} >= {
        "GATEWAY_BACKENDS",
        "GATEWAY_MODELS",
        "GATEWAY_HOST",
        "GATEWAY_PORT",
        "GATEWAY_HEALTH_INTERVAL_S",
        "GATEWAY_MAX_BODY_BYTES",
        "GATEWAY_LOG_LEVEL",
    }


def test_documented_defaults_are_the_defaults_in_force() -> None:
    documented = {variable.name: variable.default for variable in VARIABLES} | ONE
    parsed = Settings.from_environ(documented)
    assert parsed == Settings.from_environ(ONE)
    assert parsed == Settings(backends=parsed.backends, pinned={})


def test_readme_documents_every_variable_with_its_default() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for variable in VARIABLES:
        default = f"`{variable.default}`" if variable.default else "(unset)"
        assert f"| `{variable.name}` | {default} |" in readme, variable.name


def test_routing_defaults_to_round_robin_and_takes_the_prefix_knobs() -> None:
    settings = Settings.from_environ(ONE)
    assert settings.routing == "round_robin"
    assert (settings.prefix_index_entries, settings.prefix_load_factor) == (160000, 1.5)
    settings = Settings.from_environ(
        {
            **ONE,
            "GATEWAY_ROUTING": "Prefix",
            "GATEWAY_PREFIX_INDEX_ENTRIES": "1000",
            "GATEWAY_PREFIX_LOAD_FACTOR": "1.25",
            "GATEWAY_PREFIX_BLOCK_BYTES": "512",
            "GATEWAY_PREFIX_MISS": "Hash",
        }
    )
    assert settings.routing == "prefix"
    assert (settings.prefix_index_entries, settings.prefix_load_factor) == (1000, 1.25)
    assert (settings.prefix_block_bytes, settings.prefix_miss) == (512, "hash")
    assert Settings.from_environ(ONE).prefix_miss == "auto"


def test_bad_routing_settings_are_named() -> None:
    found = problems(
        {
            **ONE,
            "GATEWAY_ROUTING": "random",
            "GATEWAY_PREFIX_INDEX_ENTRIES": "0",
            "GATEWAY_PREFIX_LOAD_FACTOR": "0.9",
            "GATEWAY_PREFIX_BLOCK_BYTES": "16",
            "GATEWAY_PREFIX_MISS": "random",
        }
    )
    assert [problem.split("=")[0] for problem in found] == [
        "GATEWAY_ROUTING",
        "GATEWAY_PREFIX_INDEX_ENTRIES",
        "GATEWAY_PREFIX_LOAD_FACTOR",
        "GATEWAY_PREFIX_BLOCK_BYTES",
        "GATEWAY_PREFIX_MISS",
    ]
    assert "auto, least_loaded, hash" in found[-1]
    assert "round_robin, least_loaded, prefix" in found[0]
