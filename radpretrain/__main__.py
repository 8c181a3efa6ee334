"""`python -m radpretrain` runs the command line."""

from radpretrain.cli import main

raise SystemExit(main())
