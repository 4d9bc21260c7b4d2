"""``python -m asaf_fx.calibrate``: the same command as ``python -m asaf_fx calibrate``.

Only for running: the Python function ``asaf_fx.calibrate`` lives in ``asaf_fx.calibration``, and
importing this module would shadow it.
"""

if __name__ == "__main__":
    import sys

    from asaf_fx.cli.calibrate import main

    sys.exit(main())
