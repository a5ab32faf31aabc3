"""Bucket history in PostgreSQL: the writer, its statements, partition maintenance and schema migrations."""
