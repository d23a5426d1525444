"""The prediction log's writer: every served prediction, one row each, in the table of
prediction_table.py (SQLite by default, or PostgreSQL).

Shipped inside every .mar; the handler writes one batch per transaction right after inference, before
it answers, so a worker crash can lose at most the batch in flight (whose requests fail too), and a
clean shutdown loses nothing. The write is on the prediction path, so it is kept cheap: raw pixels
rather than a PNG per row, one DBAPI connection per worker and the insert compiled once.
Clients (UI, the corrections export, the load tests) read the log with prediction_table.py alone.

PREDICTION_LOG_URL selects the database: a SQLAlchemy URL such as sqlite:////abs/path/predictions.db
(serving/server.py sets <run dir>/predictions.db by default: prediction_table.url_for_run_dir) or postgresql+psycopg://user@host/db;
"off" or unset disables recording.

Bounded: each writing worker's background thread deletes the rows older than MAX_AGE_DAYS and the
oldest rows beyond MAX_ROWS every PRUNE_INTERVAL_S, PRUNE_BATCH_ROWS per transaction (see `prune`).
Every row keeps its metadata and the pixels the model saw; the uploaded file's bytes are kept for a
fraction INPUT_SAMPLE_RATE of the rows, chosen from the request id (`keeps_input`). Measured bytes
per row (`pytest -s tests/test_prediction_log.py -k bytes_per_row`, 2,000 rows each; SQLite: file
size after VACUUM, PostgreSQL 15: pg_total_relation_size, table + TOAST + index):
                                                       SQLite  PostgreSQL
    drawn digits (280x280 PNG, 1.3 KB), every upload    3,967       2,261
    drawn digits, uploads of 10% (the default)          1,642       1,434
    CIFAR-10 images (32x32 PNG, 2.3 KB), every upload   6,148       6,402
    CIFAR-10 images, uploads of 10%                     4,571       4,624
So the default 1,000,000 rows take 1.4 to 4.6 GB; a photo sampled keeps up to MAX_INPUT_BYTES more.
(SQLite's digits with every upload: a row of ~2.5 KB fills a 4 KiB page alone.)

Durable: when the database is unavailable (a connection or disk error) the rows go to a local spool
(`Spool`, one JSON-lines file per worker under SPOOL_DIR, at most SPOOL_MAX_MB each: past that the
oldest rows are dropped, counted, with a warning), the worker stops trying the database for RETRY_S
(a PostgreSQL connect gives up after CONNECT_TIMEOUT_S) and its background thread writes the spool
to the database once it is back. The inserts are idempotent (ON CONFLICT DO NOTHING on request_id),
so a batch that was committed just before its connection failed is not written twice. A spool
left by a worker that stopped is written by the next worker that records.

Settings: the constants MAX_AGE_DAYS to RETRY_S below (the fields of `Settings`), each overridden by
the environment variable PREDICTION_LOG_<NAME> (PREDICTION_LOG_MAX_ROWS=...); serving/server.py
passes its environment on to TorchServe's workers and sets PREDICTION_LOG_SPOOL_DIR=<run dir>/spool.
"""
import base64
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from prediction_table import PredictionTable, check_schema, predictions

MAX_INPUT_BYTES = 256 * 1024  # larger uploads keep their hash, not their bytes
MAX_AGE_DAYS = 30.0  # rows older than this are deleted; 0: no age limit
MAX_ROWS = 1_000_000  # the oldest rows beyond this many are deleted; 0: no limit
INPUT_SAMPLE_RATE = 0.1  # fraction of rows that keep the uploaded file's bytes (0..1)
PRUNE_INTERVAL_S = 60.0  # seconds between two prunes by one worker
SPOOL_DIR = str(Path(tempfile.gettempdir()) / "prediction_log_spool")  # server.py: <run dir>/spool
SPOOL_MAX_MB = 256.0  # MiB per worker process
RETRY_S = 5.0  # seconds a worker spools without trying the database after a failure
PRUNE_BATCH_ROWS = 2000  # rows deleted per transaction: SQLite's writers wait for each (30 ms here)
REPLAY_BATCH_ROWS = 1000  # spooled rows written per transaction
SPOOL_SUFFIX = ".jsonl"
BINARY_COLUMNS = ("input_bytes", "model_input")  # base64 in the spool

logger = logging.getLogger(__name__)
RECORDED = [c.key for c in predictions.c if c.key != "true_label"]  # what record_row fills in


@dataclasses.dataclass(frozen=True)
class Settings:
    """What bounds a writer's log and spool; the defaults are the module's constants."""
    max_age_days: float = MAX_AGE_DAYS
    max_rows: int = MAX_ROWS
    input_sample_rate: float = INPUT_SAMPLE_RATE
    prune_interval_s: float = PRUNE_INTERVAL_S
    spool_dir: str = SPOOL_DIR
    spool_max_mb: float = SPOOL_MAX_MB
    retry_s: float = RETRY_S

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is not str and not value >= 0:  # `not >=` also refuses NaN
                raise ValueError(f"PREDICTION_LOG_{field.name.upper()}={value!r}: must be >= 0")
        if self.input_sample_rate > 1:
            raise ValueError(f"PREDICTION_LOG_INPUT_SAMPLE_RATE={self.input_sample_rate!r}: a fraction, 0..1")
        if not (self.prune_interval_s > 0 and self.retry_s > 0 and self.spool_dir):
            raise ValueError("PREDICTION_LOG_PRUNE_INTERVAL_S and PREDICTION_LOG_RETRY_S must be > 0, "
                             "PREDICTION_LOG_SPOOL_DIR a folder")

    @classmethod
    def from_env(cls, environ=os.environ) -> "Settings":
        """The defaults, overridden by PREDICTION_LOG_<FIELD> (PREDICTION_LOG_MAX_ROWS=500000)."""
        values = {}
        for field in dataclasses.fields(cls):
            name = f"PREDICTION_LOG_{field.name.upper()}"
            text = environ.get(name, "").strip()
            if not text:
                continue
            kind = field.type
            try:
                values[field.name] = kind(text)
            except ValueError:
                raise ValueError(f"{name}={text!r}: expected a{'n integer' if kind is int else ' number'}") from None
        return cls(**values)


def url_from_env() -> str | None:
    url = os.environ.get("PREDICTION_LOG_URL", "off")
    return None if url in ("", "off") else url


def keeps_input(request_id: str, rate: float) -> bool:
    """Whether the row of `request_id` keeps the uploaded bytes: a fraction `rate` of request ids,
    the same ones on every run and in every process (a hash, not a random draw)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") < rate * 2 ** 64


def record_row(request_id: str, model: str, version: str, fmt: str, client: str, payload: bytes,
               pixels: np.ndarray, result: dict, latency_ms: float) -> dict:
    return dict(request_id=request_id, created=time.time(), model=model, version=version, format=fmt,
                client=client[:32], input_sha256=hashlib.sha256(payload).hexdigest(),
                input_bytes=payload if len(payload) <= MAX_INPUT_BYTES else None, input_size=len(payload),
                model_input=pixels.tobytes(), model_input_shape=",".join(map(str, pixels.shape)),
                label=result["label"], index=result["index"], confidence=result["confidence"],
                top_k=result["top_k"], latency_ms=latency_ms)


def _spool_line(row: dict) -> bytes:
    encoded = {k: base64.b64encode(row[k]).decode("ascii") if k in BINARY_COLUMNS and row[k] is not None else row[k]
               for k in RECORDED}
    return json.dumps(encoded).encode() + b"\n"


def _unspool_line(line: bytes) -> dict:
    """A spooled row; ValueError (or KeyError) when the line is cut short or not one."""
    if not line.endswith(b"\n"):
        raise ValueError("incomplete line")
    row = json.loads(line)
    return {k: base64.b64decode(row[k]) if k in BINARY_COLUMNS and row[k] is not None else row[k] for k in RECORDED}


def _lines(path: Path, start: int, end: int) -> int:
    """Newlines between two offsets of a file."""
    count = 0
    with open(path, "rb") as f:
        f.seek(start)
        while f.tell() < end:
            count += f.read(min(1 << 20, end - f.tell())).count(b"\n")
    return count


class Spool:
    """Rows the database did not take, on local disk until it does: one append-only JSON-lines
    file per worker process (bytes in base64) under `directory`. A worker holds an flock on its own
    file for its life, so no other worker touches the file meanwhile; once the worker is gone (a
    clean shutdown or a crash) the file is free and the next worker that replays adopts it. A file
    holds at most `max_bytes` plus a batch: past that the oldest half is dropped, the rows counted
    in `dropped`, with a warning. The writer appends and the maintenance thread replays: `lock`."""

    def __init__(self, directory, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}{SPOOL_SUFFIX}"
        self.file = None  # this worker's own spool, opened and locked on its first append
        self.replayed = 0  # bytes at the head of the own file that are in the database already
        self.generation = 0  # bumped when the own file is rewritten: a replay in progress rereads it
        self.adopted = None  # [file, offset] of a stopped worker's spool, being replayed
        self.dropped = 0  # rows lost to the size limit or unreadable, since the worker started
        self.lock = threading.Lock()

    def append(self, rows: list[dict]):
        data = b"".join(map(_spool_line, rows))
        with self.lock:
            if self.file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "ab")
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(self.file.fileno()).st_size + len(data) > self.max_bytes:
                self._shed()
            self.file.write(data)
            self.file.flush()  # a clean exit, or a crash of the worker alone, keeps it; no fsync, as SQLite's NORMAL

    def _shed(self):
        """Keep the newest half of the own file (whole rows), dropping the rest."""
        size = os.fstat(self.file.fileno()).st_size
        partial = self.path.with_suffix(".tmp")  # not *.jsonl: no other worker looks at it
        with open(self.path, "rb") as old, open(partial, "wb") as new:
            old.seek(max(0, size - self.max_bytes // 2))
            if old.tell():
                old.readline()  # the rest of a row cut in two
            cut = old.tell()
            shutil.copyfileobj(old, new)
        lost = _lines(self.path, self.replayed, cut) if cut > self.replayed else 0
        kept = open(partial, "ab")
        fcntl.flock(kept, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(partial, self.path)
        self.file.close()
        self.file, self.replayed, self.generation = kept, 0, self.generation + 1
        self.dropped += lost
        logger.warning("prediction log: the spool %s reached its limit of %.1f MiB: dropped its %d oldest rows "
                       "(%d dropped since this worker started)", self.path, self.max_bytes / 2 ** 20, lost,
                       self.dropped)

    def pending(self) -> bool:
        with self.lock:
            if self.file is not None and os.fstat(self.file.fileno()).st_size > self.replayed:
                return True
        if self.adopted is not None:
            return True
        for path in self.directory.glob(f"*{SPOOL_SUFFIX}"):
            try:  # a worker's emptied file stays (its lock with it) until the worker is gone: only rows count
                if path != self.path and path.stat().st_size:
                    return True
            except FileNotFoundError:  # finished by another worker just now
                pass
        return False

    def replay(self, insert, limit: int = REPLAY_BATCH_ROWS) -> int:
        """Hand the spooled rows, `limit` at a time, to insert(rows) until none are left; an
        exception from insert stops it, and those rows stay. Returns how many rows insert took."""
        done = 0
        while True:
            with self.lock:
                own = self.file is not None and os.fstat(self.file.fileno()).st_size > self.replayed
                if own:
                    generation, start = self.generation, self.replayed
                    with open(self.path, "rb") as f:
                        f.seek(start)
                        lines = list(itertools.islice(f, limit))
            if own:
                insert(self._rows(lines, self.path))
                done += len(lines)
                with self.lock:
                    if generation == self.generation:  # else rewritten meanwhile: reread (ON CONFLICT skips repeats)
                        self.replayed = start + sum(map(len, lines))
                        if self.replayed == os.fstat(self.file.fileno()).st_size:
                            self.file.truncate(0)
                            self.replayed = 0
                continue
            if self.adopted is None:
                self.adopted = self._adopt()
                if self.adopted is None:
                    return done
            file, offset = self.adopted
            file.seek(offset)
            lines = list(itertools.islice(file, limit))
            if lines:
                insert(self._rows(lines, Path(file.name)))
                done += len(lines)
                self.adopted[1] = file.tell()
            else:
                # Emptied before unlinking: a worker that opened it meanwhile finds nothing to write twice.
                os.truncate(file.fileno(), 0)
                Path(file.name).unlink(missing_ok=True)
                file.close()
                self.adopted = None

    def _adopt(self):
        """A spool no worker holds any more, opened and locked; None when there is none."""
        for path in sorted(self.directory.glob(f"*{SPOOL_SUFFIX}")):
            if path == self.path:
                continue
            try:
                file = open(path, "r+b")  # r+: emptied before it is unlinked
            except FileNotFoundError:  # adopted and finished by another worker just now
                continue
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(file.fileno()).st_ino == os.stat(path).st_ino:  # else replaced or gone meanwhile
                    return [file, 0]
            except (BlockingIOError, FileNotFoundError):  # its worker is alive, or it is gone
                pass
            file.close()
        return None

    def _rows(self, lines: list[bytes], path: Path) -> list[dict]:
        rows = []
        for line in lines:
            try:
                rows.append(_unspool_line(line))
            except (ValueError, KeyError, TypeError):  # a write cut short by a crash or a full disk
                self.dropped += 1
                logger.warning("prediction log: an unreadable row in the spool %s skipped (%d dropped since this "
                               "worker started)", path, self.dropped)
        return rows


class PredictionLog(PredictionTable):
    """The writing worker's log: its batches, its spool, and the pruning that bounds the table."""

    def __init__(self, url: str, settings: Settings = Settings()):
        super().__init__(url)
        self.settings = settings
        dialect_insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[self.engine.dialect.name]
        # Idempotent: a batch whose commit failed may be in the database all the same, and is spooled.
        self.upsert = dialect_insert(predictions).on_conflict_do_nothing(index_elements=["request_id"])
        insert = self.upsert.compile(dialect=self.engine.dialect, column_keys=RECORDED)
        self.insert_sql = str(insert)
        self.insert_order = insert.positiontup if insert.positional else None  # SQLite: ?, PostgreSQL: %(name)s
        self.writer = None  # the writing worker's own DBAPI connection, opened on its first batch
        self.spool = Spool(settings.spool_dir, int(settings.spool_max_mb * 2 ** 20))
        self.retry_at = 0.0  # monotonic time before which the writer spools without trying the database
        self.down = False  # the database failed and the spool has not been written back since
        self.maintainer = None  # the background thread, started by the first batch

    def record(self, rows: list[dict]):
        """Insert one batch in one transaction, on the worker's own DBAPI connection with the insert
        compiled once: a pooled connection checked out and pinged per batch, and SQLAlchemy's
        per-row parameter processing, cost as much as the insert itself. Rows not sampled lose their
        input bytes here. When the database is unavailable the batch goes to the spool; any other
        failure (a bug, a row the database refuses) raises and the batch is dropped."""
        if not rows:
            return
        if self.maintainer is None:
            self.maintainer = threading.Thread(target=self._maintain, name="prediction-log", daemon=True)
            self.maintainer.start()
        rate = self.settings.input_sample_rate
        rows = [row if row["input_bytes"] is None or keeps_input(row["request_id"], rate)
                else dict(row, input_bytes=None) for row in rows]
        if time.monotonic() >= self.retry_at:
            try:
                self._write(rows)
                return
            except Exception as e:  # noqa: BLE001 - sorted right below
                if not self._unavailable(e):
                    raise
                self.retry_at = time.monotonic() + self.settings.retry_s
                if not self.down:
                    self.down = True
                    logger.warning("prediction log: the database is unavailable (%s); rows go to the spool %s until "
                                   "it is back (tried again every %.0f s)", " ".join(str(e).split()), self.spool.path,
                                   self.settings.retry_s)
        self.spool.append(rows)

    def _write(self, rows: list[dict]):
        params = [dict(row, top_k=json.dumps(row["top_k"])) for row in rows]
        if self.insert_order:
            params = [tuple(p[name] for name in self.insert_order) for p in params]
        if self.writer is None:
            self._check_schema_once()
            self.writer = self.engine.raw_connection()
        try:
            self.writer.cursor().executemany(self.insert_sql, params)
            self.writer.commit()
        except Exception:
            self.writer.invalidate()
            self.writer = None
            raise

    def _check_schema_once(self):
        if not self.schema_checked:
            check_schema(self.engine)
            self.schema_checked = True

    def _unavailable(self, error: Exception) -> bool:
        """A lost connection, a refused one, a locked, read-only or full SQLite file: worth spooling."""
        dbapi = self.engine.dialect.dbapi
        return isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError, dbapi.OperationalError,
                                  dbapi.InterfaceError))

    def replay_spool(self) -> int:
        """Write the spooled rows (this worker's and any stopped worker's) to the database; returns
        how many. Raises while the database is unavailable; rows it refuses are dropped and logged."""
        def insert(rows):
            if not rows:
                return
            try:
                with self.engine.begin() as connection:
                    connection.execute(self.upsert, rows)
            except Exception as e:
                if self._unavailable(e):
                    raise
                self.spool.dropped += len(rows)
                logger.exception("prediction log: the database refused %d spooled rows; dropped", len(rows))
        self._check_schema_once()
        return self.spool.replay(insert)

    def _maintain(self):
        """The writing worker's background thread, so that neither replaying the spool nor pruning
        is on a request's path; a failure is logged and the work tried again on a later tick."""
        tick = min(self.settings.retry_s, self.settings.prune_interval_s)
        # Workers start together: spread their prunes over the interval.
        next_prune = time.monotonic() + random.uniform(0, self.settings.prune_interval_s)
        first = True  # the first tick also removes the emptied files that stopped workers left
        while True:
            time.sleep(tick)
            if first or self.spool.pending():
                first = False
                try:
                    replayed = self.replay_spool()
                    if replayed:  # the database took rows: the writer need not wait for its retry
                        self.retry_at, self.down = 0.0, False
                        logger.warning("prediction log: %d spooled rows written to the database", replayed)
                except Exception as e:  # noqa: BLE001 - the database is still down, or a bug: both logged
                    if not self._unavailable(e):
                        logger.exception("prediction log: writing the spool failed")
            if (self.settings.max_rows or self.settings.max_age_days) and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.settings.prune_interval_s
                try:
                    self.prune()
                except Exception as e:  # noqa: BLE001 - pruning waits for the next interval
                    logger.warning("prediction log: pruning failed, next try in %.0f s (%s)",
                                   self.settings.prune_interval_s, " ".join(str(e).split()))

    def prune(self) -> int:
        """Delete the rows older than max_age_days and the oldest beyond max_rows, oldest first (by
        the indexed `created`), PRUNE_BATCH_ROWS per transaction so that no writer waits long for a
        lock. Workers pruning at once delete each row once: PostgreSQL skips the rows another
        pruner has locked, SQLite has one writer at a time. Returns the rows this call deleted."""
        created = predictions.c.created
        doomed = []
        if self.settings.max_age_days:
            doomed.append(created < time.time() - self.settings.max_age_days * 86400)
        if self.settings.max_rows:
            with self.engine.connect() as connection:
                excess = connection.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one() \
                    - self.settings.max_rows
                if excess > 0:  # the newest row past the limit; rows written since are newer
                    newest = connection.execute(sa.select(created).order_by(created).offset(excess - 1)
                                                .limit(1)).scalar_one_or_none()
                    if newest is not None:
                        doomed.append(created <= newest)
        deleted = 0
        while doomed:
            oldest = (sa.select(predictions.c.request_id).where(sa.or_(*doomed)).order_by(created)
                      .limit(PRUNE_BATCH_ROWS).with_for_update(skip_locked=True))
            with self.engine.begin() as connection:
                count = connection.execute(predictions.delete().where(
                    predictions.c.request_id.in_(oldest.scalar_subquery()))).rowcount
            deleted += count
            if count < PRUNE_BATCH_ROWS:
                break
        return deleted
