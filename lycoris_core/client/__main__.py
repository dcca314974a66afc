"""``python -m lycoris_core.client run WORKFLOW_API.json --out DIR ...``"""

import sys

from .cli import main

sys.exit(main())
