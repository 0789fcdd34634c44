import sys

from merge_xlstm.cli import main

sys.exit(main())
