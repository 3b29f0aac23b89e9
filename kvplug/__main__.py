from kvplug.cli import main

raise SystemExit(main())
