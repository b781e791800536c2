"""audit hash chain: chain columns on audit_events, checkpoints, consumer cursors

Revision ID: 0003_i19
Revises: 0002
Create Date: (hand-written, issue 19)

Rows written before this revision keep NULL chain columns until the node's
sealer reaches them (storage.audit_chain seals in id order).
"""

from alembic import op
import sqlalchemy as sa


revision = '0003_i19'
down_revision = '0003_i21'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_checkpoints',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ts', sa.DateTime(timezone=True), nullable=False),
    sa.Column('chain_seq', sa.BigInteger(), nullable=False),
    sa.Column('row_hash', sa.String(length=64), nullable=False),
    sa.Column('mac', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_checkpoints')),
    sa.UniqueConstraint('chain_seq', name=op.f('uq_audit_checkpoints_chain_seq'))
    )
    op.create_table('audit_cursors',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('chain_seq', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_audit_cursors'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('chain_seq', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('prev_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('row_hash', sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_audit_events_chain_seq'), ['chain_seq'])


def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_audit_events_chain_seq'), type_='unique')
        batch_op.drop_column('row_hash')
        batch_op.drop_column('prev_hash')
        batch_op.drop_column('chain_seq')
    op.drop_table('audit_cursors')
    op.drop_table('audit_checkpoints')
