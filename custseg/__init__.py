"""custseg: customer value segmentation, from data to a monitored production model."""

__version__ = "0.1.0"
