"""Recurring runs: APScheduler + SQLite submitting real jobs to a real token-authenticated head."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from cluster.scheduler import _current_slot, record_missed_slots
from ray_head import TOKEN, stop_tree, token_env
from test_job_ray import quick_digits_spec

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "orchestrator.cli"]


def test_current_slot_is_the_latest_cron_time_not_after_now():
    now = datetime(2026, 1, 1, 12, 0, 37, tzinfo=timezone.utc)
    assert _current_slot("*/15 * * * * *", 5, now) == now.replace(second=30)
    assert _current_slot("0 * * * *", 60, now.replace(minute=0, second=20)) == now.replace(minute=0, second=0)


def test_missed_slots_are_recorded_once(tmp_path):
    from cluster.scheduler import _db

    conn = _db(tmp_path / "s.sqlite")
    created = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    conn.execute("INSERT INTO schedules VALUES ('s1', 'x.yaml', '*/10 * * * * *', 'http://x', "
                 "'/r', NULL, 'skip', 5, ?)", (created.isoformat(),))
    now = created + timedelta(seconds=43)  # slots 10, 20, 30, 40 passed; 40 is within grace
    assert record_missed_slots(tmp_path / "s.sqlite", now) == 3
    assert record_missed_slots(tmp_path / "s.sqlite", now) == 0  # idempotent
    slots = [r[0] for r in conn.execute("SELECT slot FROM firings ORDER BY slot")]
    assert [s[17:19] for s in slots] == ["10", "20", "30"]


def _job_info(head: str, job_id: str) -> dict:
    request = urllib.request.Request(f"{head}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def _firings(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute("SELECT * FROM firings ORDER BY slot")]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


@pytest.mark.ray
def test_schedule_fires_survives_restart_and_never_overlaps(head, tmp_path, digits_teacher):
    spec = quick_digits_spec("scheduled-digits", "scheduled", epochs=3, teacher=digits_teacher,
                             recurring={"cron": "*/10 * * * * *", "overlap": "skip",
                                        "misfire_grace_s": 5})
    spec_path = tmp_path / "scheduled.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    db = tmp_path / "schedules.sqlite"
    env = token_env(TOKEN)
    added = subprocess.run(CLI + ["schedule", "add", str(spec_path), "--address", head,
                                  "--run-root", str(tmp_path / "runs"), "--db", str(db)],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    schedule_id = added.stdout.strip()

    def start(log_name: str) -> subprocess.Popen:
        return subprocess.Popen(CLI + ["scheduler", "--db", str(db)], cwd=ROOT, env=env,
                                stdout=open(tmp_path / log_name, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    scheduler = start("scheduler-1.log")
    try:
        first = _wait_for(lambda: [f for f in _firings(db) if f["ray_job_id"]], 60, "a submission")
        # the job outlasts the 10 s interval: the next slot is skipped, not run beside it
        _wait_for(lambda: [f for f in _firings(db) if f["status"] == "skipped"], 60, "a skip")
    finally:
        stop_tree(scheduler)
    down_at = datetime.now(timezone.utc)
    time.sleep(22)  # a 10 s cron: slots pass, and their 5 s grace too, while it is down
    scheduler = start("scheduler-2.log")
    try:
        _wait_for(lambda: [f for f in _firings(db) if f["status"] == "missed"], 30, "missed slots")
        # after the restart the schedule fires again once the first run has ended
        _wait_for(lambda: len([f for f in _firings(db) if f["ray_job_id"]]) >= 2, 240,
                  "a second submission")
        _wait_for(lambda: all(f["final_status"] for f in _firings(db) if f["ray_job_id"]), 240,
                  "final statuses")
    finally:
        stop_tree(scheduler)

    rows = _firings(db)
    assert all(r["schedule_id"] == schedule_id for r in rows)
    submitted = [r for r in rows if r["ray_job_id"]]
    assert len({r["ray_job_id"] for r in submitted}) == len(submitted)
    assert {r["final_status"] for r in submitted} == {"SUCCEEDED"}
    missed = [r for r in rows if r["status"] == "missed"]
    assert all(datetime.fromisoformat(r["slot"]) > down_at - timedelta(seconds=15) for r in missed)
    # never two runs of the schedule at once: the Ray jobs' lifetimes do not overlap
    spans = sorted((_job_info(head, r["ray_job_id"])["start_time"],
                    _job_info(head, r["ray_job_id"])["end_time"]) for r in submitted)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
    assert first[0]["ray_job_id"] == submitted[0]["ray_job_id"]
    listed = subprocess.run(CLI + ["schedule", "list", "--db", str(db)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert schedule_id in listed.stdout and "missed" in listed.stdout and "SUCCEEDED" in listed.stdout
