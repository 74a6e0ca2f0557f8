#!/usr/bin/env python3
"""Build tcprelay as one file: dist/tcprelay.pyz, a zipapp (standard library ``zipapp``).

    python3 scripts/build_zipapp.py                  # dist/tcprelay.pyz
    python3 scripts/build_zipapp.py --output /tmp/tcprelay.pyz

It holds tcprelay/*.py (no compiled files: one archive runs on every CPython
3.6 to 3.13) and a __main__.py that runs ``python3 -m tcprelay``'s dispatch:

    python3 tcprelay.pyz relay 8080
    ./tcprelay.pyz echoserver localhost 8080          # its shebang: /usr/bin/env python3

Python compiles the modules at each start (it cannot write .pyc files into
the archive): about a tenth of a second.
"""

import argparse
import glob
import os
import shutil
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tcprelay")
DEFAULT_OUTPUT = os.path.join(ROOT, "dist", "tcprelay.pyz")
INTERPRETER = "/usr/bin/env python3"

# The archive's own __main__.py. zipapp's main= would drop main()'s exit code.
ARCHIVE_MAIN = '''\
"""python3 tcprelay.pyz PROGRAM [ARGS...]: tcprelay's programs in one file
(built by scripts/build_zipapp.py; --help lists the programs)."""
import sys

if sys.version_info < (3, 6):   # said in words any Python can read
    sys.exit("tcprelay needs Python 3.6 or later; this is Python %d.%d" % sys.version_info[:2])

from tcprelay.__main__ import main  # noqa: E402

sys.exit(main())
'''


def build(output):
    """Write the zipapp to ``output`` (a path; its folder is made if missing)."""
    staging = tempfile.mkdtemp(prefix="tcprelay-zipapp-")
    try:
        # Only the modules: a copy, since zipapp's filter= is 3.7+.
        os.mkdir(os.path.join(staging, "tcprelay"))
        for path in sorted(glob.glob(os.path.join(PACKAGE, "*.py"))):
            shutil.copy2(path, os.path.join(staging, "tcprelay"))
        with open(os.path.join(staging, "__main__.py"), "w", encoding="utf-8") as f:
            f.write(ARCHIVE_MAIN)
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder):
            os.makedirs(folder)
        options = {"compressed": True} if sys.version_info >= (3, 7) else {}
        zipapp.create_archive(staging, output, interpreter=INTERPRETER, **options)
    finally:
        shutil.rmtree(staging)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 scripts/build_zipapp.py",
                                     description="Build tcprelay as one file, a zipapp.")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="PATH",
                        help="where to write it (default: dist/tcprelay.pyz)")
    args = parser.parse_args(argv)
    build(args.output)
    sys.stdout.write("%s\n" % args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
