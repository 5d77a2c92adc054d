"""`python -m openchroma.serving ...` = `openchroma serve ...`."""

from .app import main

raise SystemExit(main())
