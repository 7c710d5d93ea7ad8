"""``python -m binderbox.launch``: install what sessions need when it is missing.

Today that is configurable-http-proxy (from npm, into ``<state_dir>/node``); prints its path.
"""

import sys

from binderbox.launch.proxy import main

sys.exit(main())
