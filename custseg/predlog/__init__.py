"""The prediction log: tables, the SQL store, the writer thread, metrics."""
