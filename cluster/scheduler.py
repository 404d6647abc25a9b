"""Recurring compression runs: APScheduler with a SQLite job store submits due runs to a cluster.

    stillhouse schedule add examples/digits.yaml --cron "0 2 * * *" --address http://HEAD:8265 \\
        --run-root /shared/runs --db schedules.sqlite
    stillhouse schedule list --db schedules.sqlite
    stillhouse scheduler --db schedules.sqlite          # long-running; Ctrl-C or SIGTERM stops it
    stillhouse schedule remove ID --db schedules.sqlite

One SQLite file holds APScheduler's job store (the triggers, which survive restarts) and two
tables of ours: `schedules` (what to submit where) and `firings` (one row per slot: its Ray job id
and final status, or why it did not run). Policies, from the spec's `recurring` section:

* a slot is run at most once: `firings` has one row per (schedule, slot) and `fire` claims the row
  before it submits anything; the Ray job's submission id is made from the schedule and the slot,
  so the cluster itself refuses a second submission of a slot;
* one scheduler per store: `serve` holds an exclusive lock on `<db>.lock`, and a second scheduler
  on the same store exits with an error instead of firing the same schedules beside the first;
* a scheduler stopped between claiming a slot and recording its submission leaves a `claimed`
  row; at start-up the cluster is asked for that slot's submission id, and the row becomes
  `submitted` (the job exists) or `interrupted` (it does not); the slot is not run again;
* never two runs of one schedule at once: APScheduler's `max_instances=1` stops concurrent
  `fire` calls, and `fire` asks the cluster whether the previous run is still going; if it is, the
  slot is recorded `skipped` (overlap `skip`) or waits for it to end (overlap `queue`); a slot
  that comes while a queued one still waits is recorded `skipped` too;
* missed slots: `coalesce=True` and `misfire_grace_time` from the spec: slots missed while the
  scheduler was down run once, late, if it is back within the grace time; older ones are
  recorded `missed` and not run. APScheduler's default grace of one second would silently drop
  any run that starts late.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from specs import load_spec
from specs.errors import InputError

log = logging.getLogger("stillhouse.scheduler")

SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    id TEXT PRIMARY KEY, spec_path TEXT NOT NULL, cron TEXT NOT NULL, address TEXT NOT NULL,
    run_root TEXT NOT NULL, data_dir TEXT, overlap TEXT NOT NULL, misfire_grace_s INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS firings (
    schedule_id TEXT NOT NULL, slot TEXT NOT NULL, recorded_at TEXT NOT NULL,
    status TEXT NOT NULL, ray_job_id TEXT, final_status TEXT, detail TEXT,
    PRIMARY KEY (schedule_id, slot)
);
"""
ACTIVE = {"PENDING", "RUNNING"}


class ScheduleError(InputError, ValueError):
    """A schedule cannot be added, found or run as asked."""


def _db(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)  # autocommit
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    return conn


def _now() -> datetime:
    return datetime.now(timezone.utc)


def cron_trigger(cron: str):
    """An APScheduler CronTrigger from 5 crontab fields, or 6 with a leading seconds field."""
    from apscheduler.triggers.cron import CronTrigger

    fields = cron.split()
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(cron, timezone=timezone.utc)
        if len(fields) == 6:
            second, minute, hour, day, month, dow = fields
            return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                               day_of_week=dow, timezone=timezone.utc)
    except ValueError as err:
        raise ScheduleError(f"bad cron {cron!r}: {err}") from None
    raise ScheduleError(f"bad cron {cron!r}: 5 or 6 fields expected")


def _apscheduler(db_path: str | Path, *, blocking: bool):
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    cls = BlockingScheduler if blocking else BackgroundScheduler
    return cls(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{Path(db_path).resolve()}")},
        timezone=timezone.utc,
    )


def add(db_path: str | Path, spec_path: str, *, address: str, run_root: str,
        cron: str | None = None, data_dir: str | None = None) -> str:
    """Validate the spec and cron, store the schedule and its trigger; returns the schedule id."""
    spec = load_spec(spec_path)  # SpecError propagates: nothing is stored for a bad spec
    cron = cron or spec.recurring.cron
    if not cron:
        raise ScheduleError("no cron: pass --cron or set `recurring.cron` in the spec")
    trigger = cron_trigger(cron)
    schedule_id = f"{spec.name}-{uuid.uuid4().hex[:6]}"
    conn = _db(db_path)
    conn.execute(
        "INSERT INTO schedules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (schedule_id, str(Path(spec_path).resolve()), cron, address, run_root, data_dir,
         spec.recurring.overlap, spec.recurring.misfire_grace_s, _now().isoformat()),
    )
    scheduler = _apscheduler(db_path, blocking=False)
    scheduler.start(paused=True)  # only to write the trigger into the job store
    try:
        scheduler.add_job(
            fire, trigger, id=schedule_id, name=spec.name, args=[str(Path(db_path).resolve()), schedule_id],
            coalesce=True, max_instances=1, misfire_grace_time=spec.recurring.misfire_grace_s,
            replace_existing=True,
        )
    finally:
        scheduler.shutdown(wait=False)
    return schedule_id


def remove(db_path: str | Path, schedule_id: str) -> None:
    from apscheduler.jobstores.base import JobLookupError

    conn = _db(db_path)
    if conn.execute("DELETE FROM schedules WHERE id = ?", (schedule_id,)).rowcount == 0:
        raise ScheduleError(f"no schedule {schedule_id!r}")
    scheduler = _apscheduler(db_path, blocking=False)
    scheduler.start(paused=True)
    try:
        scheduler.remove_job(schedule_id)
    except JobLookupError:
        pass
    finally:
        scheduler.shutdown(wait=False)


def listing(db_path: str | Path) -> list[dict]:
    conn = _db(db_path)
    rows = [dict(r) for r in conn.execute("SELECT * FROM schedules ORDER BY created_at")]
    for row in rows:
        row["firings"] = firings(db_path, row["id"])
        try:
            found = conn.execute("SELECT next_run_time FROM apscheduler_jobs WHERE id = ?",
                                 (row["id"],)).fetchone()
        except sqlite3.OperationalError:  # no trigger stored yet
            found = None
        row["next_run"] = (datetime.fromtimestamp(found[0], timezone.utc).isoformat()
                           if found and found[0] else None)
    return rows


def firings(db_path: str | Path, schedule_id: str) -> list[dict]:
    conn = _db(db_path)
    return [dict(r) for r in conn.execute(
        "SELECT * FROM firings WHERE schedule_id = ? ORDER BY slot", (schedule_id,))]


def _current_slot(cron: str, grace_s: int, now: datetime) -> datetime:
    """The latest slot of `cron` at or before `now`. APScheduler calls `fire` within the grace
    time of its slot; the extra two minutes cover a slow start of the call itself."""
    trigger = cron_trigger(cron)
    slot, probe = None, now - timedelta(seconds=grace_s + 120)
    while True:
        nxt = trigger.get_next_fire_time(None, probe)
        if nxt is None or nxt > now:
            break
        slot, probe = nxt, nxt + timedelta(microseconds=1)
    return slot or now.replace(microsecond=0)


def submission_id(schedule_id: str, slot: str) -> str:
    """The Ray job submission id of one slot: the cluster refuses a second job with it."""
    compact = datetime.fromisoformat(slot).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"stillhouse-{schedule_id}-{compact}"


def fire(db_path: str, schedule_id: str) -> None:
    """Called by APScheduler at each slot: claim the slot, respect overlap, submit, record."""
    from cluster import jobs

    conn = _db(db_path)
    row = conn.execute("SELECT * FROM schedules WHERE id = ?", (schedule_id,)).fetchone()
    if row is None:
        return
    slot = _current_slot(row["cron"], row["misfire_grace_s"], _now()).isoformat()
    try:  # claim: a slot never runs twice, whatever happens to the scheduler
        conn.execute("INSERT INTO firings (schedule_id, slot, recorded_at, status) VALUES (?, ?, ?, ?)",
                     (schedule_id, slot, _now().isoformat(), "claimed"))
    except sqlite3.IntegrityError:
        log.warning("schedule %s: slot %s already recorded; not run again", schedule_id, slot)
        return

    def record(status: str, ray_job_id: str | None = None, detail: str | None = None) -> None:
        conn.execute("UPDATE firings SET status = ?, ray_job_id = ?, detail = ? "
                     "WHERE schedule_id = ? AND slot = ?",
                     (status, ray_job_id, detail, schedule_id, slot))

    previous = conn.execute(
        "SELECT ray_job_id FROM firings WHERE schedule_id = ? AND ray_job_id IS NOT NULL "
        "ORDER BY slot DESC LIMIT 1", (schedule_id,)).fetchone()
    try:
        if previous is not None:
            state = jobs.status(row["address"], previous["ray_job_id"])
            if state in ACTIVE and row["overlap"] == "skip":
                record("skipped", detail=f"previous run {previous['ray_job_id']} still {state}")
                log.info("schedule %s: slot %s skipped, %s still %s", schedule_id, slot,
                         previous["ray_job_id"], state)
                return
            if state in ACTIVE:  # overlap: queue (max_instances=1: at most one waits)
                jobs.wait(row["address"], previous["ray_job_id"], timeout=float("inf"), poll=2)
        spec = load_spec(row["spec_path"])  # read now: the newest spec (and teacher) each time
        run_dir = f"{row['run_root']}/{schedule_id}/{slot.replace(':', '').replace('+0000', 'Z')}"
        job_id = jobs.submit(spec, row["address"], run_dir=run_dir, data_dir=row["data_dir"],
                             submission_id=submission_id(schedule_id, slot),
                             metadata={"schedule_id": schedule_id, "slot": slot})
        record("submitted", job_id)
        log.info("schedule %s: slot %s submitted as %s", schedule_id, slot, job_id)
    except Exception as err:  # a failed submission is recorded, and the scheduler goes on
        record("failed", detail=str(err).splitlines()[0] if str(err) else type(err).__name__)
        log.error("schedule %s: slot %s not submitted: %s", schedule_id, slot, err)


def refresh_statuses(db_path: str | Path) -> None:
    """Record the final status of every submitted run that has ended."""
    from cluster import jobs
    from cluster.jobs import TERMINAL, ClusterError

    conn = _db(db_path)
    pending = conn.execute(
        "SELECT f.schedule_id, f.slot, f.ray_job_id, s.address FROM firings f "
        "JOIN schedules s ON s.id = f.schedule_id "
        "WHERE f.ray_job_id IS NOT NULL AND f.final_status IS NULL").fetchall()
    for f in pending:
        try:
            state = jobs.status(f["address"], f["ray_job_id"])
        except ClusterError as err:
            log.warning("cannot refresh %s: %s", f["ray_job_id"], err)
            continue
        if state in TERMINAL:
            conn.execute("UPDATE firings SET final_status = ? WHERE schedule_id = ? AND slot = ?",
                         (state, f["schedule_id"], f["slot"]))


def settle_claims(db_path: str | Path) -> int:
    """At start-up: a `claimed` row is a slot whose scheduler stopped before it recorded the
    submission. The cluster says whether that slot's job exists; returns how many rows changed.
    A cluster that cannot be reached leaves the row for the next start."""
    from cluster import jobs

    conn = _db(db_path)
    settled = 0
    for f in conn.execute(
        "SELECT f.schedule_id, f.slot, s.address FROM firings f JOIN schedules s "
        "ON s.id = f.schedule_id WHERE f.status = 'claimed'").fetchall():
        job_id = submission_id(f["schedule_id"], f["slot"])
        try:
            jobs.status(f["address"], job_id)
            status, found, detail = "submitted", job_id, "submission recorded at scheduler start"
        except jobs.NoSuchJob:
            status, found, detail = "interrupted", None, "the scheduler stopped before submitting"
        except jobs.ClusterError as err:
            log.warning("schedule %s: slot %s left claimed: %s", f["schedule_id"], f["slot"], err)
            continue
        settled += conn.execute(
            "UPDATE firings SET status = ?, ray_job_id = ?, detail = ? WHERE schedule_id = ? "
            "AND slot = ? AND status = 'claimed'",
            (status, found, detail, f["schedule_id"], f["slot"])).rowcount
    return settled


def lock_store(db_path: str | Path):
    """Hold `<db>.lock` for as long as the returned file stays open; a second scheduler on the
    same store gets a ScheduleError."""
    from trainers.locks import LockHeld, exclusive_lock

    try:
        return exclusive_lock(Path(f"{Path(db_path).resolve()}.lock"))
    except LockHeld as held:
        raise ScheduleError(f"another scheduler ({held}) is serving {db_path}; "
                            "one scheduler per store") from None


def record_missed_slots(db_path: str | Path, now: datetime | None = None) -> int:
    """At start-up: every slot since a schedule's last record that is now past its grace time
    (the scheduler was down) gets a `missed` row; returns how many. Slots still within grace are
    left to APScheduler, which runs them once, late."""
    conn = _db(db_path)
    now = now or _now()
    added = 0
    for row in conn.execute("SELECT * FROM schedules").fetchall():
        last = conn.execute("SELECT MAX(slot) FROM firings WHERE schedule_id = ?",
                            (row["id"],)).fetchone()[0]
        since = datetime.fromisoformat(last) if last else datetime.fromisoformat(row["created_at"])
        cutoff = now - timedelta(seconds=row["misfire_grace_s"])
        trigger = cron_trigger(row["cron"])
        slot = trigger.get_next_fire_time(None, since + timedelta(microseconds=1))
        while slot is not None and slot < cutoff:
            added += conn.execute(
                "INSERT OR IGNORE INTO firings (schedule_id, slot, recorded_at, status, detail) "
                "VALUES (?, ?, ?, 'missed', 'scheduler was down past misfire_grace_s')",
                (row["id"], slot.isoformat(), now.isoformat())).rowcount
            slot = trigger.get_next_fire_time(None, slot + timedelta(microseconds=1))
    return added


def serve(db_path: str | Path, refresh_s: float = 5.0) -> None:
    """Run the scheduler until SIGINT/SIGTERM."""
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

    db_path = Path(db_path).resolve()
    lock = lock_store(db_path)  # noqa: F841 (held until the process ends)
    settled = settle_claims(db_path)
    if settled:
        log.warning("%d slots claimed by a stopped scheduler were settled", settled)
    missed = record_missed_slots(db_path)
    if missed:
        log.warning("%d slots were missed while the scheduler was down", missed)
    scheduler = _apscheduler(db_path, blocking=True)

    def note(job_id: str, times: list[datetime], status: str, detail: str) -> None:
        """Slots APScheduler did not run, recorded as such."""
        conn = _db(db_path)
        for time_ in times:
            slot = time_.astimezone(timezone.utc).isoformat()
            conn.execute(
                "INSERT OR IGNORE INTO firings (schedule_id, slot, recorded_at, status, detail) "
                "VALUES (?, ?, ?, ?, ?)", (job_id, slot, _now().isoformat(), status, detail))
            log.warning("schedule %s: slot %s %s: %s", job_id, slot, status, detail)

    def on_missed(event) -> None:
        note(event.job_id, [event.scheduled_run_time], "missed",
             "scheduler was down past misfire_grace_s")

    def on_busy(event) -> None:  # overlap `queue`: the slot before still waits inside `fire`
        note(event.job_id, event.scheduled_run_times, "skipped", "an earlier slot was still queued")

    scheduler.add_listener(on_missed, EVENT_JOB_MISSED)
    scheduler.add_listener(on_busy, EVENT_JOB_MAX_INSTANCES)
    # bookkeeping job, in memory only: not part of the persistent schedules
    scheduler.add_jobstore("memory", alias="bookkeeping")
    scheduler.add_job(refresh_statuses, "interval", seconds=refresh_s, args=[str(db_path)],
                      jobstore="bookkeeping", id="refresh", coalesce=True, max_instances=1)

    def stop(signum, frame) -> None:
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("scheduler up, store %s", db_path)
    scheduler.start()
