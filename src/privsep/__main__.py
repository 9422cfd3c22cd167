"""``python -m privsep`` is the ``runner`` command."""

import sys

from privsep.runner.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
