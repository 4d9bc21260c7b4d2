"""Command-line tools: thin argparse layers over the Python API, run as ``python -m asaf_fx COMMAND``."""
