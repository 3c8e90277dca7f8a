from silmm.cli import main

raise SystemExit(main())
