"""lorareg's version: recorded in every file, report and card it writes."""

__version__ = "0.1.0"
