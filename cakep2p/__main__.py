"""`python -m cakep2p` runs the same entry point as the `cakep2p` script."""

from cakep2p.cli import main

raise SystemExit(main())
