"""The database: engine, tables, migrations, and the job store."""
