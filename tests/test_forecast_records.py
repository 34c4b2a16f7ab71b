"""The forecast's record beside the audit log, the advise finding built from it, the status
line, and alerts.exhaustion_within in the policy file. No server needed."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from watchdog.audit import forecast_log
from watchdog.commands.advise.findings import sort_findings
from watchdog.commands.advise.forecast import exhaustion_forecast
from watchdog.commands.forecast_render import forecast_json, forecast_line
from watchdog.config.policy import AlertsConfig, parse_config
from watchdog.config.yamlpos import load_yaml
from watchdog.core.forecast import Episode, Forecast, Grower

NOW = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
LEAKY = Forecast(23, 57, 68.0, 69, eta_s=17.0, slow_eta_s=19.8, rate=2.0, window_s=10.0,
                 applications=(Grower("leaky\n  - app", 1.97, 20),),
                 clients=(Grower("192.0.2.7", 1.97, 20),))


def config_with(alerts: dict[str, object]) -> AlertsConfig:
    doc = {"targets": [{"name": "main", "dsn": "postgresql://w@h/db"}],
           "policies": [{"name": "idle", "state": "idle", "longer_than": "10m"}],
           "alerts": alerts}
    return parse_config(load_yaml(yaml.safe_dump(doc), "p.yaml", {}), "p.yaml").alerts


def test_exhaustion_within_defaults_to_ten_minutes_and_takes_a_duration() -> None:
    assert config_with({}).exhaustion_within == 600.0
    assert config_with({"exhaustion_within": "2m30s"}).exhaustion_within == 150.0


# -- the record beside the audit log -----------------------------------------------------


def test_records_go_beside_the_audit_log_not_into_it(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    path = forecast_log.forecast_path(audit)
    assert path == tmp_path / "audit.forecast.jsonl"
    crossed = forecast_log.crossed_record("main", "db:5432", LEAKY, 600.0, False, NOW)
    ended = forecast_log.ended_record(
        "main", Episode(LEAKY, 57, 9.0, 0.0, 75.0), NOW + timedelta(seconds=75))
    forecast_log.append(path, [crossed])
    forecast_log.append(path, [ended])
    assert not audit.exists()
    assert os.stat(path).st_mode & 0o777 == 0o640
    got = list(forecast_log.read(path, {"main"}, NOW - timedelta(hours=1)))
    assert [r["event"] for r in got] == ["crossed", "ended"]
    assert got[0]["applications"] == [{"name": "leaky\n  - app", "per_min": 118.2, "now": 20}]
    assert got[1]["full_after_s"] == 9.0 and got[1]["peak_used"] == 57
    assert list(forecast_log.read(path, {"other"}, NOW - timedelta(hours=1))) == []
    assert list(forecast_log.read(path, {"main"}, NOW + timedelta(minutes=1))) == [got[1]]
    assert all(line.count("\n") == 0 for line in path.read_text().splitlines())


def test_a_torn_line_is_skipped_and_the_next_record_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "audit.forecast.jsonl"
    path.write_bytes(b'{"ts": "2026-05-01T09:00:00.000Z", "target": "main", "eve')
    forecast_log.append(path, [forecast_log.crossed_record("main", "s", LEAKY, 600, False, NOW)])
    got = list(forecast_log.read(path, {"main"}, NOW - timedelta(days=1)))
    assert [r["event"] for r in got] == ["crossed"]


def test_no_record_is_written_through_a_symlink_or_into_a_fifo(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    link = tmp_path / "link.forecast.jsonl"
    link.symlink_to(victim)
    record = forecast_log.crossed_record("main", "s", LEAKY, 600, False, NOW)
    with pytest.raises(OSError):
        forecast_log.append(link, [record])
    assert victim.read_text() == "untouched\n"
    fifo = tmp_path / "fifo.forecast.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        forecast_log.append(fifo, [record])
    with pytest.raises(OSError):
        list(forecast_log.read(link, {"main"}, NOW))


def test_a_missing_file_means_no_records(tmp_path: Path) -> None:
    assert list(forecast_log.read(tmp_path / "none.jsonl", {"main"}, NOW)) == []


# -- advise ------------------------------------------------------------------------------


def test_advise_says_when_and_how_fast_it_filled_and_who_grew() -> None:
    crossed = forecast_log.crossed_record("main", "db:5432", LEAKY, 600.0, True, NOW)
    ended = forecast_log.ended_record("main", Episode(LEAKY, 57, 9.0, 0.0, 75.0),
                                      NOW + timedelta(seconds=75))
    from watchdog.config.policy import Config, Target

    config = Config("p.yaml", (Target("main", "", None, 30.0),), ())
    [finding] = exhaustion_forecast("main", [ended, crossed], config)
    assert finding.id == "exhaustion_forecast" and finding.severity == "high"
    text = "\n".join(finding.evidence)
    assert "within alerts.exhaustion_within (10m)" in text
    assert "2026-05-01T10:00:00.000Z: 23 of 57 ordinary slots used, filling at +120/min:" \
        " full in ~17s at that rate" in text
    assert "'leaky\n  - app' +118.2/min" in text  # escaped by advise's renderer, as every name
    assert "clients (real clients behind the pooler) 192.0.2.7 +118.2/min" in text
    assert "peak 57 of 57, every ordinary slot taken 9.0s after the forecast" in text
    assert any("when: {connections_above: 90%}" in line for line in finding.fix)
    assert sort_findings([finding])[0] is finding
    assert exhaustion_forecast("other", [crossed], config) == []


def test_advise_names_an_episode_with_no_end_and_one_that_never_filled() -> None:
    from watchdog.config.policy import Config, Target

    config = Config("p.yaml", (Target("main", "", None, 30.0),), ())
    crossed = forecast_log.crossed_record("main", "s", LEAKY, 600.0, False, NOW)
    [finding] = exhaustion_forecast("main", [crossed], config)
    assert finding.severity == "medium"
    assert any("no end recorded" in line for line in finding.evidence)
    ended = forecast_log.ended_record("main", Episode(LEAKY, 40), NOW + timedelta(minutes=2))
    [finding] = exhaustion_forecast("main", [crossed, ended], config)
    assert any("peak 40 of 57, never full" in line for line in finding.evidence)


# -- status ------------------------------------------------------------------------------


def test_status_line_for_each_stage_of_the_history() -> None:
    assert "status --watch 2" in forecast_line(forecast_json(None))
    young = Forecast(10, 57, 4.0, 5)
    assert forecast_line(forecast_json(young)).startswith("gathering history (4.0s of ~20s)")
    flat = Forecast(10, 57, 300.0, 300)
    assert forecast_line(forecast_json(flat)) == "not growing (history 5m00s)"
    line = forecast_line(forecast_json(LEAKY))
    assert line.startswith("slots run out in ~17s at +120/min (fitted over the last 10s)")
    assert "'leaky\\n  - app' +118.2/min" in line and "\n" not in line
    doc = forecast_json(LEAKY)
    assert json.loads(json.dumps(doc))["applications"][0]["name"] == "leaky\n  - app"
