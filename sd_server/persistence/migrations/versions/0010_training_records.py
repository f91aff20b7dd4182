"""trainings' warnings (photos left out as near-duplicates, tiny or blurry faces), samples drawn while they ran, and
their evaluator's scores

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 06:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trainings") as batch:
        batch.add_column(sa.Column("warnings", sa.Text(), nullable=True))
        batch.add_column(sa.Column("progress_samples", sa.Text(), nullable=True))
        batch.add_column(sa.Column("scores", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trainings") as batch:
        batch.drop_column("scores")
        batch.drop_column("progress_samples")
        batch.drop_column("warnings")
