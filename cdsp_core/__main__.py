from cdsp_core.cli import main

raise SystemExit(main())
