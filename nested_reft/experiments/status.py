"""A sweep's status files: what each run directory of a grid has come to (pending, running, done, failed).

`status.json` beside a run's own files records its state, the error and traceback of a failure, the number of
attempts and the times; the sweep writes it, `collect` reads it into results.csv.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nested_reft.store.files import atomic_write_json, read_json

STATUS_FILE = "status.json"
STATUSES = ("pending", "running", "done", "failed")


def read_status(directory: Path) -> dict:
    """The status record of a run directory; {"status": "pending"} where there is none (or it is unreadable)."""
    return read_json(Path(directory) / STATUS_FILE) or {"status": "pending"}


def write_status(directory: Path, status: str, **fields: Any) -> dict:
    """Update the status record atomically, keeping earlier fields (started_at, attempts) not given."""
    assert status in STATUSES, status
    record = read_status(directory)
    now = _now()
    record.update(fields, status=status, updated_at=now)
    if status == "running":
        record["attempts"] = record.get("attempts", 0) + 1
        record["started_at"] = now
        record.pop("finished_at", None)
        record.update(error=None, traceback=None)
    if status in ("done", "failed"):
        record["finished_at"] = now
    atomic_write_json(Path(directory) / STATUS_FILE, record)
    return record


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
