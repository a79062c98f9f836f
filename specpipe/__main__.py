from specpipe.cli import main

raise SystemExit(main())
