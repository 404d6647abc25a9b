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
SUBMIT_AGAIN = """
import sys
from cluster import jobs, scheduler
from specs import load_spec
spec, head, schedule_id, slot, run_dir = sys.argv[1:]
try:
    jobs.submit(load_spec(spec), head, run_dir=run_dir,
                submission_id=scheduler.submission_id(schedule_id, slot))
    print("accepted")
except jobs.JobExists as err:
    print("refused: JobExists", err)
"""


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


def test_one_scheduler_per_store_and_unsettled_claims_are_kept(tmp_path):
    """A second scheduler on the same store exits 2; a claim whose cluster cannot be reached
    stays `claimed` (it is settled at a later start, never guessed)."""
    from cluster.scheduler import _db

    db = tmp_path / "s.sqlite"
    conn = _db(db)
    conn.execute("INSERT INTO schedules VALUES ('s1', 'x.yaml', '0 3 * * *', 'http://127.0.0.1:9', "
                 "'/r', NULL, 'skip', 5, '2026-01-01T00:00:00+00:00')")
    conn.execute("INSERT INTO firings (schedule_id, slot, recorded_at, status) VALUES "
                 "('s1', '2026-01-01T03:00:00+00:00', '2026-01-01T03:00:01+00:00', 'claimed')")
    first = subprocess.Popen(CLI + ["scheduler", "--db", str(db)], cwd=ROOT,
                             stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        _wait_for(lambda: "scheduler up" in (tmp_path / "first.log").read_text(), 60, "start-up")
        second = subprocess.run(CLI + ["scheduler", "--db", str(db)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"another scheduler (pid {first.pid}) is serving" in second.stderr
        assert first.poll() is None
    finally:
        stop_tree(first)
    assert first.returncode == 0
    claim = _firings(db)[0]
    assert (claim["status"], claim["ray_job_id"]) == ("claimed", None)
    assert "left claimed" in (tmp_path / "first.log").read_text()


def _job_info(head: str, job_id: str) -> dict:
    request = urllib.request.Request(f"{head}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def _firings(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute("SELECT * FROM firings ORDER BY slot")]


def _job_ids(db: Path) -> list[str]:
    """The Ray job ids of the submitted slots, oldest slot first."""
    return [f["ray_job_id"] for f in _firings(db) if f["ray_job_id"]]


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
    # as if the scheduler had died after Ray took the first slot's job but before it recorded it,
    # and after it claimed a slot but before it submitted anything
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE firings SET status = 'claimed', ray_job_id = NULL WHERE slot = ?",
                 (first[0]["slot"],))
    conn.execute("INSERT INTO firings (schedule_id, slot, recorded_at, status) VALUES "
                 "(?, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:01+00:00', 'claimed')",
                 (schedule_id,))
    conn.close()
    time.sleep(22)  # a 10 s cron: slots pass, and their 5 s grace too, while it is down
    scheduler = start("scheduler-2.log")
    try:
        _wait_for(lambda: [f for f in _firings(db) if f["status"] == "missed"], 30, "missed slots")
        settled = {f["slot"]: f for f in _firings(db)}
        assert settled[first[0]["slot"]]["status"] == "submitted"
        assert settled[first[0]["slot"]]["ray_job_id"] == first[0]["ray_job_id"]
        assert settled["2026-01-01T00:00:00+00:00"]["status"] == "interrupted"
        # after the restart the schedule fires again once the first run has ended
        two = _wait_for(lambda: len(ids := _job_ids(db)) >= 2 and ids[:2], 240, "a second submission")
        # the scheduler records these two runs' ends; it goes on firing meanwhile, so a third run
        # may start: waiting for "every submitted run ended" would chase a moving target
        _wait_for(lambda: all(f["final_status"] for f in _firings(db) if f["ray_job_id"] in two),
                  240, "the two runs' final statuses")
    finally:
        stop_tree(scheduler)

    rows = _firings(db)
    assert all(r["schedule_id"] == schedule_id for r in rows)
    submitted = [r for r in rows if r["ray_job_id"]]
    assert len({r["ray_job_id"] for r in submitted}) == len(submitted)
    assert {r["final_status"] for r in submitted if r["ray_job_id"] in two} == {"SUCCEEDED"}
    # a run submitted after those two, before the scheduler stopped, is followed on the cluster
    for later in (r for r in submitted if r["ray_job_id"] not in two):
        ended = _wait_for(lambda: (info := _job_info(head, later["ray_job_id"]))["status"]
                          in {"SUCCEEDED", "FAILED", "STOPPED"} and info, 240, "a later run's end")
        assert ended["status"] == "SUCCEEDED", ended
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

    # the cluster itself refuses a second run of a slot: its submission id is taken (asked from
    # a fresh process: Ray keeps the first token a process loaded, maybe another cluster's)
    again = subprocess.run([sys.executable, "-c", SUBMIT_AGAIN, str(spec_path), head, schedule_id,
                            first[0]["slot"], str(tmp_path / "again")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith("refused: JobExists"), again.stdout
