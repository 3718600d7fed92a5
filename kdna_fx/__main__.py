import sys

from kdna_fx.cli import main

sys.exit(main())
