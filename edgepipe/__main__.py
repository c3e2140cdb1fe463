import os
import sys

# `python -m edgepipe` puts the current directory first on sys.path, where a stray `sklearn/` or
# `numpy.py` would shadow the real package: edgepipe itself is already imported, so drop it.
if sys.path and not sys.flags.safe_path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from edgepipe.cli import main  # noqa: E402

main()
