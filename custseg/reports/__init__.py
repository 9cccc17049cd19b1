"""HTML reports, plots and terminal rendering."""
