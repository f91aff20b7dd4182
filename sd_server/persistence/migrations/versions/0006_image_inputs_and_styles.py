"""img2img and inpainting inputs and applied styles on jobs; style presets

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 04:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("image_input", sa.Text(), nullable=True))
        batch.add_column(sa.Column("styles", sa.Text(), nullable=True))
    op.create_table(
        "styles",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("styles")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("styles")
        batch.drop_column("image_input")
