"""`python -m charlm` is the `charlm` command."""

from charlm.entry import main

main()
