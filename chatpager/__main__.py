import sys

from chatpager.cli import main

if __name__ == "__main__":  # a spawned engine process imports no entry point twice
    sys.exit(main())
