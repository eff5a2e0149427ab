"""Entry script of the bundled app: the same `cakep2p` command as the pip install (window, --serve, subcommands)."""

import multiprocessing

from cakep2p.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a frozen child process must run its task, not the app
    raise SystemExit(main())
