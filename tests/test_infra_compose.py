"""Static checks of infra/docker-compose.yml and infra/Dockerfile (no Docker engine needed).

Every Tandem service's command must exist in the ``tandem`` CLI, its TANDEM_* variables must
be fields of that service's settings, and ports/URLs must agree across services.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from typer.testing import CliRunner

from tandem.cli import app
from tandem.services.settings import ALL_TOPICS, SETTINGS_BY_SERVICE, TOPIC_AVAILABILITY, TOPIC_INTERACTIONS, TOPIC_UPDATES, dlq_topic, env_names

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "docker-compose.yml"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
TANDEM_SERVICES = ("cloud", "fleet", "replayer", "dashboard")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _cli_help(args: list[str]) -> str:
    """``tandem <args...> --help``; fails the test if that command does not exist."""
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, f"tandem {' '.join(args)}: {result.output}"
    assert "Usage: tandem " + " ".join(args) in " ".join(result.output.split()), result.output
    return result.output


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _container_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def test_services_present(compose: dict) -> None:
    assert set(compose["services"]) >= {"kafka", "topics", *TANDEM_SERVICES}


def test_kafka_is_kraft(compose: dict) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "zookeeper" not in COMPOSE.read_text().lower()
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # so the init service must create every topic
    assert "healthcheck" in kafka


def test_topic_init_creates_every_topic(compose: dict) -> None:
    topics = compose["services"]["topics"]
    script = "\n".join(topics["command"]) if isinstance(topics["command"], list) else topics["command"]
    created = set(re.findall(r"^\s*create\s+(\S+)\s+\d+", script, flags=re.M))
    wanted = set(ALL_TOPICS) | {dlq_topic(t) for t in (TOPIC_INTERACTIONS, TOPIC_AVAILABILITY, TOPIC_UPDATES)}
    assert created == wanted
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", TANDEM_SERVICES)
def test_tandem_service_command_exists(compose: dict, name: str) -> None:
    svc = compose["services"][name]
    assert svc["command"][0] == "serve" and svc["command"][1] == name
    _cli_help(list(svc["command"]))
    assert svc["build"]["dockerfile"] == "infra/Dockerfile"


@pytest.mark.parametrize("name", TANDEM_SERVICES)
def test_env_names_match_settings(compose: dict, name: str) -> None:
    env = _env(compose["services"][name])
    known = set(env_names(SETTINGS_BY_SERVICE[name]))
    unknown = {k for k in env if k.startswith("TANDEM_")} - known
    assert not unknown, f"{name}: {sorted(unknown)} are not settings of {SETTINGS_BY_SERVICE[name].__name__}"
    if name != "dashboard":
        transport = urlparse(env["TANDEM_TRANSPORT"])
        assert transport.scheme == "kafka" and transport.netloc == "kafka:9092"


def test_env_values_parse(compose: dict) -> None:
    from tandem.services.settings import from_env

    for name in TANDEM_SERVICES:
        env = {k: v for k, v in _env(compose["services"][name]).items() if "${" not in v}
        s = from_env(SETTINGS_BY_SERVICE[name], env=env)
        if "TANDEM_PORT" in env:
            assert s.port == int(env["TANDEM_PORT"])


def test_ports_and_urls_agree(compose: dict) -> None:
    services = compose["services"]
    port = {n: int(_env(services[n])["TANDEM_PORT"]) for n in TANDEM_SERVICES}
    assert len(set(port.values())) == len(port), "services should listen on distinct ports"
    assert _container_ports(services["cloud"]) == {port["cloud"]}
    assert _container_ports(services["dashboard"]) == {port["dashboard"]}
    cloud_url = urlparse(_env(services["fleet"])["TANDEM_CLOUD_URL"])
    assert (cloud_url.hostname, cloud_url.port) == ("cloud", port["cloud"])
    sources = dict(s.split("=", 1) for s in _env(services["dashboard"])["TANDEM_SOURCES"].split(","))
    for name, url in sources.items():
        u = urlparse(url)
        assert u.hostname == name and u.port == port[name], f"dashboard source {name}={url}"


def test_fleet_scales(compose: dict) -> None:
    fleet = compose["services"]["fleet"]
    assert fleet["deploy"]["replicas"] >= 2
    assert "ports" not in fleet, "a fixed host port would stop `--scale fleet=N`"
    assert "container_name" not in fleet


def test_startup_order(compose: dict) -> None:
    s = compose["services"]
    assert s["cloud"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert s["fleet"]["depends_on"]["cloud"]["condition"] == "service_healthy"
    assert s["replayer"]["depends_on"]["cloud"]["condition"] == "service_healthy"
    assert any(v.endswith(":/data") for v in s["cloud"]["volumes"]), "cloud checkpoints need a volume"


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, flags=re.M)
    assert "infra/setup.sh" in text and "download.pytorch.org/whl/cpu" in text
    assert 'ENTRYPOINT ["tandem"]' in text
    for src in re.findall(r"^COPY (\S+) ", text, flags=re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    setup = (ROOT / "infra" / "setup.sh").read_text()
    assert "--no-deps" in setup and "torchrec" in setup


@pytest.mark.skipif(not shutil.which("docker"), reason="docker client not installed")
def test_docker_compose_config() -> None:
    """``docker compose config`` when the compose plugin exists (it needs no engine)."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
