from effpose.cli import main

raise SystemExit(main())
