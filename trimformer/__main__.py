from trimformer.cli import main

raise SystemExit(main())
