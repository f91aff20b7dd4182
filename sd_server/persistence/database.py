"""The database engine (SQLite by default, or PostgreSQL), and Alembic migrations applied at start-up."""

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def create_database_engine(url: str, lock_timeout_s: float = 10.0) -> Engine:
    """An engine for ``url``. An attempt waits at most ``lock_timeout_s`` for a lock another process holds, then
    fails (and is retried, see ``retry``). SQLite also gets WAL mode and foreign keys."""
    lock_timeout_ms = int(lock_timeout_s * 1000)
    connect_args = {"options": f"-c lock_timeout={lock_timeout_ms}"} if url.startswith("postgresql") else {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda connection, record: _configure_sqlite(connection, lock_timeout_ms))
    return engine


def _configure_sqlite(connection, lock_timeout_ms: int) -> None:
    """WAL lets readers run while the worker writes; foreign keys make deletes cascade."""
    cursor = connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={lock_timeout_ms}", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def migrate(url: str) -> None:
    """Apply every Alembic migration to the database at ``url`` (same as `alembic upgrade head`)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")
