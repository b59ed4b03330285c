"""The configuration: defaults, the example file, and every problem reported by key path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from agent.config import Config, load, parse
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


# The one setting the example makes: which of the shipped example hooks run for which types.
EXAMPLE_HOOK_TYPES = {
    name: ("Reboot", "Redeploy", "Preempt", "Terminate")
    for name in ("40-stop-service", "50-k8s-drain", "60-start-service", "90-k8s-uncordon")
}


def test_the_example_file_documents_exactly_the_defaults() -> None:
    example = load(ROOT / "config.example.yaml")
    assert example.hooks.event_types == EXAMPLE_HOOK_TYPES
    assert dataclasses.replace(example.hooks, event_types={}) == Config().hooks
    assert dataclasses.replace(example, hooks=Config().hooks) == Config()


def test_the_example_s_hook_types_name_shipped_example_hooks() -> None:
    shipped = {path.name for path in (ROOT / "hooks").glob("*.d/*")}
    assert set(EXAMPLE_HOOK_TYPES) <= shipped


def test_the_example_file_names_every_key() -> None:
    data = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    defaults = Config()
    for section, values in data.items():
        if section == "vm_name":
            continue
        assert set(values) == set(vars(getattr(defaults, section))), section
    assert set(data["maintenance"]["self_service"]) == set(vars(defaults.maintenance.self_service))


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert load(path) == Config()


def test_values_are_read_into_frozen_typed_objects() -> None:
    config = parse(
        {
            "imds": {"url": "http://127.0.0.1:8254", "poll_interval_seconds": 0.5},
            "vm_name": "web_4",
            "events": {"types": ["Preempt"]},
            "approval": {"mode": "always", "shared_events": "approve"},
            "metrics": {"listen": None},
        }
    )
    assert config.imds.url == "http://127.0.0.1:8254"
    assert config.imds.poll_interval_seconds == 0.5
    assert config.imds.api_version == "2020-07-01"
    assert config.vm_name == "web_4"
    assert config.events.types == ("Preempt",)
    assert config.approval.mode == "always"
    assert config.metrics.listen is None
    with pytest.raises(AttributeError):
        config.imds.url = "http://elsewhere"  # type: ignore[misc]


def test_every_problem_is_listed_with_its_key_path() -> None:
    with pytest.raises(ConfigError) as raised:
        parse(
            {
                "imds": {"url": "169.254.169.254", "poll_interval_seconds": 0, "colour": 1},
                "hooks": {"timeout_seconds": "5m"},
                "events": {"types": ["Reboot", "Explode"]},
                "approval": {"mode": "sometimes"},
                "metrics": {"listen": "127.0.0.1"},
                "logging": "loud",
                "vm_nmae": "typo",
            },
            "test.yaml",
        )
    problems = raised.value.problems
    paths = [problem.split(":", 1)[0] for problem in problems]
    assert paths == [
        "imds.url",
        "imds.poll_interval_seconds",
        "imds.colour",
        "hooks.timeout_seconds",
        "events.types",
        "approval.mode",
        "metrics.listen",
        "logging",
        "vm_nmae",
    ]
    assert "'sometimes'" in str(raised.value)
    assert "Explode" in str(raised.value)
    assert str(raised.value).startswith("test.yaml: 9 problem(s):")


@pytest.mark.parametrize(
    "data",
    [
        [1, 2],
        {"imds": {"api_version": "2021-02-01"}},
        {"vm_name": ""},
        {"hooks": {"kill_grace_seconds": True}},
        {"metrics": {"listen": "127.0.0.1:70000"}},
        {"approval": {"shared_events": "yes"}},
    ],
)
def test_bad_values_are_rejected_not_defaulted(data: object) -> None:
    with pytest.raises(ConfigError):
        parse(data)


def test_an_explicit_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.yaml")


def test_invalid_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("imds: [\n")
    with pytest.raises(ConfigError) as raised:
        load(path)
    assert str(path) in str(raised.value)
    assert "not valid YAML" in str(raised.value)


def test_the_hook_settings_are_read() -> None:
    hooks = parse(
        {
            "hooks": {
                "pass_environment": ["KUBECONFIG", "https_proxy"],
                "environment": {"HTTPS_PROXY": "http://127.0.0.1:3128"},
                "event_types": {"50-k8s-drain": ["Reboot", "Terminate"]},
                "skip_freeze_up_to_seconds": 10,
                "skipped_events": "approve",
            }
        }
    ).hooks
    assert hooks.pass_environment == ("KUBECONFIG", "https_proxy")
    assert hooks.environment == {"HTTPS_PROXY": "http://127.0.0.1:3128"}
    assert hooks.event_types == {"50-k8s-drain": ("Reboot", "Terminate")}
    assert hooks.skip_freeze_up_to_seconds == 10
    assert hooks.skipped_events == "approve"


def test_bad_hook_settings_are_refused_with_their_key() -> None:
    with pytest.raises(ConfigError) as raised:
        parse(
            {
                "hooks": {
                    "pass_environment": ["SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN", "NO SPACE"],
                    "environment": {"SCHEDULED_EVENT_ID": "forged", "PORT": 8080},
                    "event_types": {"50-k8s-drain": ["Reboot", "Nap"], "../x": ["Reboot"]},
                    "skip_freeze_up_to_seconds": -1,
                    "skipped_events": "sometimes",
                }
            }
        )
    text = str(raised.value)
    assert (
        "hooks.pass_environment: SCHEDULED_EVENTS_AGENT_FLEET_SAS_TOKEN is the agent's own" in text
    )
    assert "'NO SPACE' is not a variable name" in text
    assert "hooks.environment: SCHEDULED_EVENT_ID is the agent's own" in text
    assert "PORT: expected a text value" in text
    assert "hooks.event_types: 50-k8s-drain: unknown event types ['Nap']" in text
    assert "'../x': expected a hook's file name" in text
    assert "hooks.skip_freeze_up_to_seconds: expected 0 to 3600" in text
    assert "hooks.skipped_events:" in text


def test_an_unquoted_api_version_date_is_read_as_the_version(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("imds:\n  api_version: 2020-07-01\n")  # YAML reads a date
    assert load(path).imds.api_version == "2020-07-01"


def test_an_unquoted_date_that_is_no_version_says_which_were_expected(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("imds:\n  api_version: 2021-02-01\n")
    with pytest.raises(ConfigError) as raised:
        load(path)
    assert "'2021-02-01'" in str(raised.value)
    assert "datetime" not in str(raised.value)


def test_a_yaml_error_names_the_file_and_the_line_not_a_unicode_string(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("imds:\n  url: http://127.0.0.1\n  api_version: [\n")
    with pytest.raises(ConfigError) as raised:
        load(path)
    text = str(raised.value)
    assert "<unicode string>" not in text
    assert f'"{path}", line' in text


def test_each_self_service_problem_gets_its_own_line_with_its_dotted_path() -> None:
    data = {
        "maintenance": {
            "self_service": {
                "enabled": "yes",
                "slots": ["Sun 02:00-04:00", "Funday 02:00-04:00", "Mon 25:00-26:00"],
                "time_zone": "Mars/Olympus",
                "update_domain_spacing_minutes": -1,
                "colour": "blue",
                "shade": 3,
            }
        }
    }
    with pytest.raises(ConfigError) as raised:
        parse(data, "test.yaml")
    problems = raised.value.problems
    assert len(problems) == 7, problems
    assert all(problem.startswith("maintenance.self_service.") for problem in problems)
    assert all(";" not in problem for problem in problems)
    assert str(raised.value).startswith("test.yaml: 7 problem(s):")
    assert "maintenance.self_service.colour: unknown key" in str(raised.value)
    zone = "maintenance.self_service.time_zone: unknown time zone 'Mars/Olympus'"
    assert any(problem.startswith(zone) for problem in problems)


@pytest.mark.parametrize("listen", ["0.0.0.0:9469", "10.0.0.4:9469", "[::]:9469", "web_4:9469"])
def test_a_metrics_address_beyond_loopback_is_refused_unless_allowed(listen: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse({"metrics": {"listen": listen}})
    assert "metrics.listen" in str(raised.value)
    assert "allow_non_loopback" in str(raised.value)
    config = parse({"metrics": {"listen": listen, "allow_non_loopback": True}})
    assert config.metrics.listen == listen


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:9469", "127.0.0.2:9469", "[::1]:9469", "localhost:9469"]
)
def test_loopback_metrics_addresses_are_accepted(listen: str) -> None:
    assert parse({"metrics": {"listen": listen}}).metrics.listen == listen
