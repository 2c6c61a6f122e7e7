"""PostgreSQL storage: the connection pool and numbered SQL migrations."""
