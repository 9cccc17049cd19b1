"""Reading and writing tables (CSV and Parquet) at the edges."""
