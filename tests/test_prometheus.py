"""monitoring/ against a real Prometheus scraping a real 2-rank training run.

One module-scoped Prometheus (Debian's, loopback, a free port, a temporary TSDB, 0.5 s
scrape and rule intervals) loads monitoring/prometheus/prometheus.yml and its rules; a
2-rank gloo torchrun of the tiny model writes its file_sd targets where that config looks.
While it trains, a second run on the same metrics ports must stop with a clear message.
The config, rules, rule unit tests and dashboard JSON are checked offline as well.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from ssgan_dist.tasks.gan import SERIES

PHASES, LOSS_TERMS = SERIES.phases, SERIES.terms

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "monitoring" / "prometheus"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "ssgan-training.json"
STEPS, BATCH, RANKS = 120, 2, 2
JOB = "prom-test"
# The run evaluates during training (random Inception weights) when torch-fidelity is there.
EVALUATES = importlib.util.find_spec("torch_fidelity") is not None

needs_prometheus = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="Debian's prometheus/promtool not installed (.ci/run installs them: apt-get install prometheus)",
)


def _free_port(pair: bool = False) -> int:
    """A free port (and, with pair, port + 1 free too: one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair or port >= 65535:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


class Prometheus:
    def __init__(self, url: str, targets: Path):
        self.url, self.targets = url, targets

    def query(self, expr: str) -> list[dict]:
        return _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        return _get(f"{self.url}/api/v1/query_range?{q}")["result"]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[Prometheus]:
    """monitoring/prometheus/prometheus.yml with 0.5 s intervals, its rules beside it, on loopback."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.skip("Debian's prometheus not installed (.ci/run installs it)")
    home = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="500ms", scrape_timeout="500ms", evaluation_interval="500ms")
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copytree(PROM_DIR / "rules", home / "rules")
    (home / "targets").mkdir()
    port = _free_port()
    log = open(home / "prometheus.log", "wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"prometheus did not start: {(home / 'prometheus.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield Prometheus(url, home / "targets")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _torchrun(run_dir: Path, shards: Path, master_port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
           "--master_addr", "127.0.0.1", "--master_port", str(master_port), "-m", "ssgan_dist.train",
           *TINY, "train.threads=1", f"run.dir={run_dir}", f"data.shards={shards}", "metrics.enabled=true", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def scraped_run(prometheus, shards32, tmp_path_factory) -> dict:
    """A 2-rank run scraped by Prometheus, and a second run started on its metrics ports meanwhile."""
    tmp = tmp_path_factory.mktemp("runs")
    evaluation = []
    if EVALUATES:
        import torch

        from test_evaluate import _random_inception_state

        torch.save(_random_inception_state(tmp), tmp / "inception.pth")
        evaluation = [f"eval.every={STEPS // 2}", f"eval.shards={shards32}", f"eval.inception_weights={tmp / 'inception.pth'}",
                      "eval.max_samples=4", f"data.cache_dir={tmp / 'cache'}"]
    base = _free_port(pair=True)
    targets = prometheus.targets / f"{JOB}.json"
    started = time.time()
    run = _torchrun(tmp / "a", shards32, _free_port(), f"train.max_steps={STEPS}", f"train.batch_size={BATCH}",
                    f"run.name={JOB}", f"metrics.port={base}", f"metrics.file_sd={prometheus.targets}/",
                    "metrics.linger_s=3", f"checkpoint.every={STEPS // 2}", *evaluation)
    try:
        while not targets.exists():  # every rank serves once rank 0 has written the targets
            assert run.poll() is None, run.communicate()[0][-4000:]
            assert time.time() - started < 180, "no targets file written"
            time.sleep(0.2)
        listed = json.loads(targets.read_text())
        clash = _torchrun(tmp / "b", shards32, _free_port(), "train.max_steps=5", "run.name=clash",
                          f"metrics.port={base}")
        clash_out, _ = clash.communicate(timeout=300)
        clash_running = run.poll() is None
        out, _ = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 0, out[-4000:]
    ended = time.time()
    return {"start": started, "end": ended, "base": base, "listed": listed, "targets": targets,
            "clash_rc": clash.returncode, "clash_out": clash_out, "clash_while_running": clash_running}


def _by_rank(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in result}


@needs_prometheus
def test_targets_list_every_rank_and_are_withdrawn_at_the_end(scraped_run):
    base = scraped_run["base"]
    assert scraped_run["listed"] == [
        {"targets": [f"127.0.0.1:{base + r}"], "labels": {"job": JOB, "rank": str(r), "node": socket.gethostname()}}
        for r in range(RANKS)
    ]
    assert not scraped_run["targets"].exists()


@needs_prometheus
def test_a_second_run_on_the_same_ports_stops_with_a_clear_message(scraped_run):
    assert scraped_run["clash_while_running"], "the first run ended before the clash was tried"
    assert scraped_run["clash_rc"] != 0
    base = scraped_run["base"]
    assert re.search(rf"metrics\.port: rank \d cannot serve metrics on 127\.0\.0\.1:{base}", scraped_run["clash_out"])


@needs_prometheus
def test_every_design_metric_is_scraped_with_sane_values(prometheus, scraped_run):
    last = lambda name: prometheus.query(f'last_over_time({name}{{job="{JOB}"}}[10m])')  # noqa: E731
    ranks = {str(r) for r in range(RANKS)}

    assert _by_rank(last("ssgan_steps_total")) == {r: STEPS for r in ranks}
    assert _by_rank(last("ssgan_images_trained_total")) == {r: STEPS * BATCH for r in ranks}
    total = prometheus.query(f'sum(last_over_time(ssgan_images_trained_total{{job="{JOB}"}}[10m]))')
    assert float(total[0]["value"][1]) == STEPS * BATCH * RANKS  # steps x global batch
    # Per rank: a scrape that times out on a loaded machine marks the series stale for a
    # moment, so a sum over the ranks may dip; each rank's own series may not.
    for series in prometheus.query_range(f'ssgan_images_trained_total{{job="{JOB}"}}',
                                         scraped_run["start"], scraped_run["end"], 0.5):
        values = [float(v) for _, v in series["values"]]
        assert values == sorted(values) and len(set(values)) >= 2, (series["metric"], values)

    phases = last("ssgan_step_phase_seconds_count")
    assert {(r["metric"]["phase"], r["metric"]["rank"]) for r in phases} == {(p, r) for p in PHASES for r in ranks}
    assert all(float(r["value"][1]) == STEPS for r in phases)
    assert prometheus.query(f'last_over_time(ssgan_step_phase_seconds_bucket{{job="{JOB}", le="+Inf"}}[10m])')

    losses = last("ssgan_loss")
    assert {(r["metric"]["term"], r["metric"]["rank"]) for r in losses} == {(t, r) for t in LOSS_TERMS for r in ranks}
    assert all(math.isfinite(float(r["value"][1])) for r in losses)
    lrs = last("ssgan_learning_rate")
    assert {(r["metric"]["net"], float(r["value"][1])) for r in lrs} == {("G", 2e-4), ("D", 2e-4)}

    assert _by_rank(last("ssgan_gpu_memory_allocated_bytes")) == {r: 0 for r in ranks}  # CPU: 0
    assert _by_rank(last("ssgan_gpu_memory_peak_bytes")) == {r: 0 for r in ranks}
    assert all(0 < v < 1 for v in _by_rank(last("ssgan_mfu_ratio")).values())
    assert _by_rank(last("ssgan_data_samples_skipped_total")) == {r: 0 for r in ranks}
    assert _by_rank(last("ssgan_nonfinite_steps_skipped_total")) == {r: 0 for r in ranks}
    assert _by_rank(last("ssgan_restarts_total")) == {r: 0 for r in ranks}
    checkpoints = _by_rank(last("ssgan_last_checkpoint_timestamp_seconds"))
    assert all(scraped_run["start"] < v < scraped_run["end"] for v in checkpoints.values()) and set(checkpoints) == ranks
    assert _by_rank(last("ssgan_step")) == {r: STEPS for r in ranks}
    assert _by_rank(last("ssgan_max_steps")) == {r: STEPS for r in ranks}
    if EVALUATES:
        assert _by_rank(last("ssgan_eval_step")) == {r: STEPS for r in ranks}
        fid, ssim = _by_rank(last("ssgan_eval_fid")), _by_rank(last("ssgan_eval_ssim"))
        assert set(fid) == ranks and len(set(fid.values())) == 1 and all(v > 0 for v in fid.values())
        assert set(ssim) == ranks and all(-1 <= v <= 1 for v in ssim.values())
    stamps = _by_rank(last("ssgan_last_step_timestamp_seconds"))
    assert all(scraped_run["start"] < v < scraped_run["end"] for v in stamps.values()) and set(stamps) == ranks
    nodes = {r["metric"]["node"] for r in last("ssgan_steps_total")}
    assert nodes == {socket.gethostname()}
    up = prometheus.query(f'max_over_time(up{{job="{JOB}"}}[10m])')
    assert _by_rank(up) == {r: 1 for r in ranks}


@needs_prometheus
def test_every_rule_evaluates_without_error(prometheus, scraped_run):
    groups = _get(f"{prometheus.url}/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 12
    assert [r["name"] for r in rules if r["health"] != "ok"] == []


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


@needs_prometheus
@pytest.mark.parametrize("rank", [".*", "1"])
def test_every_dashboard_query_returns_series(prometheus, scraped_run, rank):
    """Template variables filled in as Grafana would: $job the run, $rank All (.*) or one rank."""
    fill = {"$job": JOB, "$rank": rank, "$__rate_interval": "2s", "$__interval": "1s"}
    empty = []
    for title, expr in _panel_queries():
        if "ssgan_eval_" in expr and not EVALUATES:
            continue  # no evaluation without torch-fidelity
        for var, value in fill.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, (title, expr)
        if not prometheus.query_range(expr, scraped_run["start"], scraped_run["end"], 1.0):
            empty.append((title, expr))
    assert empty == []


@needs_prometheus
def test_promtool_checks_config_rules_and_rule_unit_tests():
    for config in ("prometheus.yml", "prometheus-static.yml"):
        subprocess.run(["promtool", "check", "config", config], cwd=PROM_DIR, check=True, capture_output=True)
    subprocess.run(["promtool", "check", "rules", "rules/ssgan.rules.yml"], cwd=PROM_DIR, check=True,
                   capture_output=True)
    tests = sorted(p.name for p in (PROM_DIR / "tests").glob("*.yml"))
    done = subprocess.run(["promtool", "test", "rules", *[f"tests/{t}" for t in tests]], cwd=PROM_DIR,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(tests)
    rules = yaml.safe_load((PROM_DIR / "rules" / "ssgan.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = {a for t in tests for a in re.findall(r"alertname: (\w+)", (PROM_DIR / "tests" / t).read_text())}
    assert alerts == tested  # every alert has a unit test


def test_every_alert_has_a_description_and_a_runbook_section():
    rules = yaml.safe_load((PROM_DIR / "rules" / "ssgan.rules.yml").read_text())
    runbooks = (ROOT / "monitoring" / "README.md").read_text()
    headings = {line[4:].strip().lower() for line in runbooks.splitlines() if line.startswith("### ")}
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) == 8
    for rule in alerts:
        notes = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(notes), rule["alert"]
        assert len(notes["description"]) > len(notes["summary"]), rule["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "monitoring/README.md" and anchor == rule["alert"].lower() and anchor in headings, rule["alert"]


def test_dashboard_parses_with_the_grafana_schema_sdk():
    """grafana-foundation-sdk decodes the JSON into its typed models (it does not validate
    values); re-encoding must give back every key we wrote, so a key outside the schema,
    a panel type without a schema or a non-Prometheus query shows up as a difference."""
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog import plugins, runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import prometheus as prom_models
    from grafana_foundation_sdk.models.dashboard import Dashboard, RowPanel

    plugins.register_default_plugins()
    source = json.loads(DASHBOARD.read_text())
    dashboard = Dashboard.from_json(source)
    again = json.loads(json.dumps(dashboard, cls=JSONEncoder))

    def lost(a, b, path=""):
        if isinstance(a, dict):
            if not isinstance(b, dict):
                return [path]
            return [x for k, v in a.items() for x in (lost(v, b[k], f"{path}.{k}") if k in b else [f"{path}.{k}"])]
        if isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                return [path]
            return [x for i, (u, v) in enumerate(zip(a, b)) for x in lost(u, v, f"{path}[{i}]")]
        return [] if a == b else [f"{path}: {a!r} became {b!r}"]

    assert lost(source, again) == []
    for panel in dashboard.panels:
        if isinstance(panel, RowPanel):
            continue
        assert runtime.panelcfg_config(panel.type_val) is not None, panel.type_val
        assert not isinstance(panel.options, dict), panel.title  # decoded into the panel type's Options
        assert all(isinstance(t, prom_models.Dataquery) for t in panel.targets), panel.title
    names = {v.name for v in dashboard.templating.list_val}
    assert names == {"datasource", "job", "rank"}
    for _, expr in _panel_queries():
        assert 'job=~"$job"' in expr
