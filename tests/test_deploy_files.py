"""The deployment files, checked statically (no Docker engine here): the structure a user relies on to bring
the stack up with one command, and docs that name every setting the service reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from billing_service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# Read by the container's CMD (worker count) and by prometheus-client, not by Settings.
NOT_SETTINGS = {"BILLING_WORKERS", "PROMETHEUS_MULTIPROC_DIR"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias if isinstance(alias, str) else f"BILLING_{name.upper()}")
    return names


def test_postgres_is_healthchecked_and_keeps_its_data_in_a_volume(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])
    assert "${POSTGRES_PASSWORD:?" in postgres["environment"]["POSTGRES_PASSWORD"]


def test_migrate_runs_once_after_postgres_is_healthy(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["billing", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    assert migrate["environment"]["DATABASE_URL"].startswith("postgresql://")


def test_api_starts_after_migrations_with_several_workers_and_secrets_from_the_environment(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    api = services["api"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert api["image"] == services["migrate"]["image"]  # the migrate step builds the image the api runs
    environment = api["environment"]
    # Secrets are required from the environment (.env), never written into the file.
    for secret in ("BILLING_SERVICE_TOKENS", "BILLING_JWT_SECRET"):
        assert re.fullmatch(r"\$\{" + secret + r":\?[^}]+\}", environment[secret]), environment[secret]
    assert int(re.sub(r"\$\{BILLING_WORKERS:-(\d+)\}", r"\1", environment["BILLING_WORKERS"])) >= 2
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert any(str(port).endswith(":8000") for port in api["ports"])


def test_compose_sets_only_variables_the_service_reads(compose: dict[str, Any]) -> None:
    known = env_names() | NOT_SETTINGS
    for name in ("migrate", "api"):
        assert set(compose["services"][name]["environment"]) <= known, name


def test_dockerfile_is_multi_stage_uv_locked_non_root_and_healthchecked(dockerfile: str) -> None:
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", dockerfile, flags=re.MULTILINE | re.IGNORECASE)
    assert stages == ["build", "runtime"]
    assert "uv sync --frozen" in dockerfile
    assert "COPY --from=build" in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :].split("\n\n")[0]
    assert "/readyz" in healthcheck
    assert re.search(r'CMD \["sh", "-c", "exec billing serve .*--workers', dockerfile)
    pinned_uv = re.search(r'UV_VERSION="([\d.]+)"', (ROOT / "scripts" / "_uv.sh").read_text())
    assert pinned_uv is not None and f"ghcr.io/astral-sh/uv:{pinned_uv.group(1)}" in dockerfile


def test_the_env_example_names_every_required_variable(compose: dict[str, Any]) -> None:
    example = (ROOT / ".env.example").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", yaml.safe_dump(compose)))
    assert required == {"POSTGRES_PASSWORD", "BILLING_SERVICE_TOKENS", "BILLING_JWT_SECRET"}
    assert all(re.search(rf"^{name}=", example, flags=re.MULTILINE) for name in required)


def test_operations_doc_names_every_setting() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    missing = sorted(name for name in env_names() | NOT_SETTINGS if f"`{name}`" not in operations)
    assert missing == []


def test_the_grafana_dashboard_covers_the_issue_and_queries_only_exported_metrics() -> None:
    import json

    from prometheus_client import REGISTRY

    import billing_service.metrics  # noqa: F401 - registers the service's metrics

    exported = set()
    for family in REGISTRY.collect():
        exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count"}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "billing.json").read_text())
    titles = [panel["title"] for panel in dashboard["panels"]]
    for topic in ("Charges per second by result", "p99 latency", "Tokens debited per minute", "402", "pool"):
        assert any(topic in title for title in titles), topic
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(billing_\w+)", target["expr"])
    }
    assert queried and queried <= exported, queried - exported
