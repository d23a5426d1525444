"""The prediction log's table and its readers: one row per served prediction, in SQLite (default) or
PostgreSQL. A small library shared by the writer (prediction_log.py, in every TorchServe worker) and
the clients that read the log (the UI, the corrections export, the load tests): SQLAlchemy and numpy
only, no spool, thread or setting of the writer's.

Shipped inside every .mar beside the handler; everything else imports it by file name, as the
handlers do (catalog.py puts handlers/ on sys.path).

A log is named by a SQLAlchemy URL: sqlite:////abs/path/predictions.db (serving/server.py uses
<run dir>/predictions.db, see url_for_run_dir) or postgresql+psycopg://user@host/db.
"""
import os
from pathlib import Path

import numpy as np
import sqlalchemy as sa

CONNECT_TIMEOUT_S = 2  # a PostgreSQL that does not answer (libpq's minimum)

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
    sa.Column("input_bytes", sa.LargeBinary),  # NULL when too large or not sampled (prediction_log.py)
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


def url_for_run_dir(run_dir) -> str:
    """$PREDICTION_LOG_URL, else SQLite beside a server's key file (the embedded default); clients
    find the log of the server whose key file they use."""
    return os.environ.get("PREDICTION_LOG_URL") or f"sqlite:///{Path(run_dir).resolve() / 'predictions.db'}"


def spool_dir_for_run_dir(run_dir) -> str:
    """$PREDICTION_LOG_SPOOL_DIR, else <run dir>/spool beside the server's logs: where its workers
    keep the rows the database could not take (prediction_log.py Spool)."""
    return os.environ.get("PREDICTION_LOG_SPOOL_DIR") or str(Path(run_dir).resolve() / "spool")


def decode_pixels(row: dict) -> np.ndarray:
    """What the model saw, as a uint8 array. Stored raw: encoding a PNG per row cost 33 us."""
    shape = tuple(int(n) for n in row["model_input_shape"].split(","))
    return np.frombuffer(row["model_input"], np.uint8).reshape(shape)


def engine_for(url: str) -> sa.Engine:
    url = sa.engine.make_url(url)
    # Without a timeout a PostgreSQL host that does not answer holds the first batch after each
    # retry for as long as TCP tries.
    connect_args = ({"connect_timeout": CONNECT_TIMEOUT_S}
                    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query else {})
    engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(connection, _):
            # WAL: readers (the UI) never block the workers' writes; NORMAL: no fsync per commit.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=10000")
    return engine


def check_schema(engine: sa.Engine):
    """Create the table where there is none; refuse one written by another version."""
    metadata.create_all(engine)
    found = {c["name"] for c in sa.inspect(engine).get_columns(predictions.name)}
    if found != set(predictions.c.keys()):
        raise RuntimeError(f"the prediction log at {engine.url!r} was written by another version (its columns: "
                           f"{sorted(found)}); move it away to start a new one")


class PredictionTable:
    """A prediction log, read (and corrected) by a client."""

    def __init__(self, url: str):
        self.engine = engine_for(url)
        try:
            check_schema(self.engine)
            self.schema_checked = True
        except (sa.exc.OperationalError, sa.exc.InterfaceError):
            self.schema_checked = False  # the database is down: the first write that reaches it checks

    def _filtered(self, query, where: dict):
        for column, value in where.items():
            query = query.where(predictions.c[column] == value)
        return query

    def recent(self, limit: int = 50, offset: int = 0, **where) -> list[dict]:
        """The newest rows first, `offset` rows skipped; `where`: column=value filters (client="ui")."""
        query = sa.select(predictions).order_by(predictions.c.created.desc()).limit(limit).offset(offset)
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(self._filtered(query, where))]

    def count(self, **where) -> int:
        query = sa.select(sa.func.count()).select_from(predictions)
        with self.engine.connect() as connection:
            return connection.execute(self._filtered(query, where)).scalar_one()

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
