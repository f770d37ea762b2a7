"""Alembic environment: the URL comes from `billing_service.db.migrate`, never from an ini file."""

from alembic import context
from sqlalchemy import create_engine, pool

connectable = context.config.attributes.get("connection")
if connectable is None:
    connectable = create_engine(context.config.get_main_option("sqlalchemy.url", ""), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connectable, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
