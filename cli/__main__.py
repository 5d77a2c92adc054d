"""`python -m openchroma.cli ...` = the `openchroma` console script."""

from . import main

raise SystemExit(main())
