"""Alembic environment: the URL comes from the caller (persistence.database.migrate) or from the service settings."""

import sys
from pathlib import Path

from alembic import context

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the project root, for `alembic upgrade head` run there

from config import Settings  # noqa: E402
from sd_server.persistence.database import create_database_engine  # noqa: E402
from sd_server.persistence.tables import Base  # noqa: E402

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings().effective_database_url


def run_migrations() -> None:
    """Run the migrations in one transaction on a live connection."""
    engine = create_database_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
