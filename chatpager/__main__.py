import sys

from chatpager.cli import main

sys.exit(main())
