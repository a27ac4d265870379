"""The deployment examples in deploy/ are valid: for HAProxy and nginx as they check them, for
Kubernetes as the dispatcher's own command line reads it (and the grace period covers the stop)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.cli import config_from_args

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _tool(name: str) -> str | None:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(_tool("haproxy") is None, reason="haproxy is not installed")
def test_the_haproxy_example_is_valid() -> None:
    done = subprocess.run([_tool("haproxy") or "", "-c", "-f", str(DEPLOY / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(_tool("nginx") is None, reason="nginx is not installed")
def test_the_nginx_example_is_valid() -> None:
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([_tool("nginx") or "", "-t", "-c", str(DEPLOY / "nginx.conf"), "-p", folder,
                               "-e", os.path.join(folder, "error.log"), "-g", f"pid {folder}/nginx.pid;"],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_kubernetes_example_is_a_valid_command_with_enough_grace() -> None:
    deployment, service = yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][0] == "dispatcher"
    config = config_from_args(container["command"][1:])
    # Kubernetes kills the pod after the grace period: the drain delay and the graceful stop fit in it.
    assert pod["terminationGracePeriodSeconds"] >= config.drain_delay_s + config.graceful_timeout_s
    admin_port = int(config.metrics.rsplit(":", 1)[1]) if config.metrics else None
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["admin"] == admin_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert "preStop" not in container.get("lifecycle", {})


def test_the_prometheus_example_scrapes_the_admin_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == {"dispatcher", "dispatcher-pods"}
