"""Debian's nginx run by a test in front of real replicas (tests/test_load_balancer.py, the web page behind a path
prefix in tests/test_web_page.py): found (required where .ci/run sets DDPM_REQUIRE_SYSTEM_TOOLS), checked, started on
a config, waited for, stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def nginx_or_skip(module: bool = False) -> str:
    """The nginx binary; else the test (``module``: the whole file) skipped, or failed where CI requires nginx."""
    if NGINX is None:
        if os.environ.get("DDPM_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail("nginx is required in CI but not installed", pytrace=False)
        pytest.skip("nginx is not installed (apt-get install nginx-light)", allow_module_level=module)
    return NGINX


class NginxProcess:
    """nginx on ``conf`` (its relative paths under ``prefix``), started once ``nginx -t`` passes and answering at ``probe``."""

    def __init__(self, conf: Path, prefix: Path, probe: str) -> None:
        nginx = nginx_or_skip()
        check = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(prefix)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        end = time.monotonic() + 10
        while True:
            try:
                httpx.get(probe, timeout=1)
                return
            except httpx.HTTPError:
                assert time.monotonic() < end, "nginx did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def under_a_prefix(upstream: str, tmp_path: Path) -> tuple[NginxProcess, str]:
    """nginx serving ``upstream`` at /ddpm/ (``location /ddpm/ { proxy_pass upstream/; }``: the prefix taken off, as one
    host's several services are published), and that prefix's URL."""
    from tests.server_process import free_port

    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\nevents {{}}\nhttp {{ access_log off;\n"
        f"  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;\n"
        f"  fastcgi_temp_path {tmp_path}/f; uwsgi_temp_path {tmp_path}/u; scgi_temp_path {tmp_path}/s;\n"
        f"  server {{ listen 127.0.0.1:{port};\n"
        f"    location / {{ return 404; }}\n"
        f"    location /ddpm/ {{ proxy_pass {upstream}/; proxy_buffering off; proxy_http_version 1.1; }} }} }}\n",
        encoding="utf-8",
    )
    prefix = f"http://127.0.0.1:{port}/ddpm"
    return NginxProcess(conf, tmp_path, prefix + "/healthz"), prefix
