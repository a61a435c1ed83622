"""The ``kvquant`` command line."""
