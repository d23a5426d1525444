"""The prediction log: every served prediction, one row each, in SQLite (default) or PostgreSQL.

Shipped inside every .mar; the handler writes one batch per transaction right after inference, before
it answers, so a worker crash can lose at most the batch in flight (whose requests fail too), and a
clean shutdown loses nothing. The write is on the prediction path, so it is kept cheap: raw pixels
rather than a PNG per row, one DBAPI connection per worker and the insert compiled once.
Clients (UI, modelctl, the corrections export) read the log with the same table.

PREDICTION_LOG_URL selects the database: a SQLAlchemy URL such as sqlite:////abs/path/predictions.db
(serving/server.py sets <run dir>/predictions.db by default, see url_for_run_dir) or postgresql+psycopg://user@host/db;
"off" or unset disables recording.
"""
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

MAX_INPUT_BYTES = 256 * 1024  # larger uploads keep their hash, not their bytes

metadata = sa.MetaData()
predictions = sa.Table(
    "predictions", metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("created", sa.Float, nullable=False, index=True),  # unix time (s)
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("format", sa.String(32), nullable=False),
    sa.Column("client", sa.String(32), nullable=False),  # X-Client header: ui, api, loadtest, ...
    sa.Column("input_sha256", sa.String(64), nullable=False),
    sa.Column("input_bytes", sa.LargeBinary),  # NULL when over MAX_INPUT_BYTES
    sa.Column("input_size", sa.Integer, nullable=False),
    sa.Column("model_input", sa.LargeBinary, nullable=False),  # what the model saw: uint8 pixels, row-major
    sa.Column("model_input_shape", sa.String(16), nullable=False),  # "28,28" or "32,32,3"
    sa.Column("label", sa.String(32), nullable=False),
    sa.Column("index", sa.Integer, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("top_k", sa.JSON, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),  # handler time of the request's batch
    sa.Column("true_label", sa.String(32)),  # set later when a user corrects the prediction
)


def decode_pixels(row: dict) -> np.ndarray:
    """What the model saw, as a uint8 array. Stored raw: encoding a PNG per row cost 33 us."""
    shape = tuple(int(n) for n in row["model_input_shape"].split(","))
    return np.frombuffer(row["model_input"], np.uint8).reshape(shape)


def engine_for(url: str) -> sa.Engine:
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(connection, _):
            # WAL: readers (the UI) never block the workers' writes; NORMAL: no fsync per commit.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=10000")
    metadata.create_all(engine)
    found = {c["name"] for c in sa.inspect(engine).get_columns(predictions.name)}
    if found != set(predictions.c.keys()):
        raise RuntimeError(f"the prediction log at {engine.url!r} was written by another version (its columns: "
                           f"{sorted(found)}); move it away to start a new one")
    return engine


def url_for_run_dir(run_dir) -> str:
    """$PREDICTION_LOG_URL, else SQLite beside a server's key file (the embedded default); clients
    find the log of the server whose key file they use."""
    return os.environ.get("PREDICTION_LOG_URL") or f"sqlite:///{Path(run_dir).resolve() / 'predictions.db'}"


def url_from_env() -> str | None:
    url = os.environ.get("PREDICTION_LOG_URL", "off")
    return None if url in ("", "off") else url


def record_row(request_id: str, model: str, version: str, fmt: str, client: str, payload: bytes,
               pixels: np.ndarray, result: dict, latency_ms: float) -> dict:
    return dict(request_id=request_id, created=time.time(), model=model, version=version, format=fmt,
                client=client[:32], input_sha256=hashlib.sha256(payload).hexdigest(),
                input_bytes=payload if len(payload) <= MAX_INPUT_BYTES else None, input_size=len(payload),
                model_input=pixels.tobytes(), model_input_shape=",".join(map(str, pixels.shape)),
                label=result["label"], index=result["index"], confidence=result["confidence"],
                top_k=result["top_k"], latency_ms=latency_ms)


class PredictionLog:
    def __init__(self, url: str):
        self.engine = engine_for(url)
        recorded = [c.key for c in predictions.c if c.key != "true_label"]  # what record_row fills in
        insert = predictions.insert().compile(dialect=self.engine.dialect, column_keys=recorded)
        self.insert_sql = str(insert)
        self.insert_order = insert.positiontup if insert.positional else None  # SQLite: ?, PostgreSQL: %(name)s
        self.writer = None  # the writing worker's own DBAPI connection, opened on its first batch

    def record(self, rows: list[dict]):
        """Insert one batch in one transaction, on the worker's own DBAPI connection with the insert
        compiled once: a pooled connection checked out and pinged per batch, and SQLAlchemy's
        per-row parameter processing, cost as much as the insert itself. A failed batch drops it."""
        if not rows:
            return
        params = [dict(row, top_k=json.dumps(row["top_k"])) for row in rows]
        if self.insert_order:
            params = [tuple(p[name] for name in self.insert_order) for p in params]
        if self.writer is None:
            self.writer = self.engine.raw_connection()
        try:
            self.writer.cursor().executemany(self.insert_sql, params)
            self.writer.commit()
        except Exception:
            self.writer.invalidate()
            self.writer = None
            raise

    def recent(self, limit: int = 50, client: str | None = None) -> list[dict]:
        query = sa.select(predictions).order_by(predictions.c.created.desc()).limit(limit)
        if client:
            query = query.where(predictions.c.client == client)
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(query)]

    def count(self, **where) -> int:
        query = sa.select(sa.func.count()).select_from(predictions)
        for column, value in where.items():
            query = query.where(predictions.c[column] == value)
        with self.engine.connect() as connection:
            return connection.execute(query).scalar_one()

    def correct(self, request_id: str, true_label: str) -> bool:
        """Record the right answer for a prediction; False when the request id is unknown."""
        with self.engine.begin() as connection:
            result = connection.execute(predictions.update().where(predictions.c.request_id == request_id)
                                        .values(true_label=true_label))
        return result.rowcount == 1

    def corrections(self, model: str | None = None) -> list[dict]:
        query = sa.select(predictions).where(predictions.c.true_label.is_not(None))
        if model:
            query = query.where(predictions.c.model == model)
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(query.order_by(predictions.c.created))]
