"""`python -m orchestration run [--job NAME]`: see orchestration/launch.py."""

import sys

from orchestration.launch import main

sys.exit(main())
