"""`python -m clipfast.cli` (e.g. under torchrun: `torchrun ... -m clipfast.cli defend ...`)."""

import sys

from clipfast.cli import main

sys.exit(main())
