from jepa_engine.cli import main

raise SystemExit(main())
