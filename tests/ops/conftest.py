"""Fixtures of the ops suite: the real `promtool` and `prometheus` binaries (tests skip with
the reason when they are absent; `.ci/run` installs Debian's `prometheus` package), the deploy
files, and a Prometheus server of the test's own on loopback.

`PrometheusServer` runs `prometheus` as a harness `Process` (tests/e2e/harness.py): on a free
port, with its storage in a temporary directory, scraping every second, stopped when its
fixture ends whatever the test did.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from tests.e2e.harness import ROOT, Process, Stack, free_port

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_EXAMPLE = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "fundgate.json"
OPERATIONS = ROOT / "docs" / "operations.md"


def catalogue_series() -> set[str]:
    """Every series name the catalogue can export (families plus _total, _bucket, ...)."""
    m = Metrics()
    names: set[str] = set()
    for collector in m.registry.collect():
        names.add(collector.name)
        names.update(s.name for s in collector.samples)
    # a labelled family exports no sample until used: add its type's suffixes
    for family in text_string_to_metric_families(m.render()[0].decode()):
        if family.type == "counter":
            names.update({f"{family.name}_total", f"{family.name}_created"})
        if family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "count", "sum", "created"))
    return names


def github_anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    anchors = set()
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^#{1,6}\s+(.*?)\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


MISSING = "not installed (Debian package `prometheus`; .ci/run installs it when missing)"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} {MISSING}")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _binary("prometheus")


def run_promtool(promtool: str, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run promtool; its exit code and its stdout and stderr together."""
    proc = subprocess.run(
        [promtool, *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


class PromQLError(AssertionError):
    pass


@dataclass
class PrometheusServer:
    """A Prometheus server on loopback; `query` goes through its HTTP API."""

    url: str
    process: Process

    def api(self, path: str, **params: str) -> Any:
        resp = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0)
        body = resp.json()
        if resp.status_code != 200 or body.get("status") != "success":
            raise PromQLError(f"{path} {params}: HTTP {resp.status_code}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: the result vector (a scalar comes back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] != "vector":
            raise PromQLError(f"{expr}: a {data['resultType']}, not a vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, expr: str, by: str) -> dict[str, float]:
        """The result of `expr` as {value of label `by`: sample value}."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {len(result)} samples"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, expected: float, timeout: float = 20.0) -> None:
        """Poll until `expr` evaluates to `expected` (scrapes land every second)."""
        deadline = time.monotonic() + timeout
        seen: float | None = None
        while True:
            seen = self.scalar(expr)
            if seen == expected:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} is {seen}, not {expected}, after {timeout} s")
            time.sleep(0.25)


def prometheus_config(targets: Sequence[str], rule_files: Sequence[Path]) -> str:
    listed = ", ".join(f'"{t}"' for t in targets)
    rules = "".join(f'\n  - "{p}"' for p in rule_files)
    return (
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files:{rules or ' []'}\n"
        "scrape_configs:\n"
        "  - job_name: fundgate\n"
        f"    static_configs:\n      - targets: [{listed}]\n"
    )


def run_prometheus(
    binary: str, workdir: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()
) -> Iterator[PrometheusServer]:
    """Start a server scraping `targets`; yield it; stop it (SIGTERM, then SIGKILL)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(targets, rule_files), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = Process(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        log_path=workdir / "prometheus.log",
        ready_url=f"{url}/-/ready",
    )
    try:
        process.start()
        process.wait_ready()
        yield PrometheusServer(url, process)
    finally:
        process.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, attach the tail of every process log of the test (gateway, banks,
    Prometheus) to the report."""
    report = yield
    if report.failed:
        tails = []
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Stack):
                tails.append(value.log_tails())
            elif isinstance(value, PrometheusServer):
                tails.append(f"----- prometheus -----\n{value.process.log_tail(30)}")
        if tails:
            report.sections.append(("process logs", "\n".join(tails)))
    return report
