"""``python -m align ...`` is the ``align`` command (align/cli.py), also under ``accelerate launch -m align
train ...`` on every learner process. The CLI imports the command modules (``align.train`` and the rest)
lazily inside its handlers, so no command module needs to import the CLI back."""

import sys

from align.cli import main

if __name__ == "__main__":
    sys.exit(main())
