"""PostgreSQL: the pool, migrations, the embedded server and every query (SQL lives here)."""
