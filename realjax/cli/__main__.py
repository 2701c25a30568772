from realjax.cli import main

raise SystemExit(main())
