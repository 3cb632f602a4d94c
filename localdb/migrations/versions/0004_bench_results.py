"""Benchmark results per (variant, hardware fingerprint), and variants' side files.

A variant may now need files next to its main one (ONNX external weights, a tokenizer,
onnxruntime-genai's genai_config.json): `variant_files` records each by name and blob.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "variant_files",
        sa.Column("variant_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["sha256"], ["artifacts.sha256"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["variant_id"], ["variants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("variant_id", "name"),
    )
    op.create_index("ix_variant_files_sha256", "variant_files", ["sha256"], unique=False)
    op.create_table(
        "bench_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("variant_id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("load_seconds", sa.Float(), nullable=False),
        sa.Column("peak_rss", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tps", sa.Float(), nullable=True),
        sa.Column("generation_tps", sa.Float(), nullable=True),
        sa.Column("perplexity", sa.Float(), nullable=True),
        sa.Column("embeddings_per_second", sa.Float(), nullable=True),
        sa.Column("agreement", sa.Float(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["variant_id"], ["variants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("variant_id", "fingerprint", name="uq_bench_results_variant_hw"),
    )


def downgrade() -> None:
    op.drop_table("bench_results")
    op.drop_index("ix_variant_files_sha256", table_name="variant_files")
    op.drop_table("variant_files")
