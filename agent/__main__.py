from agent.cli.fovea import main

raise SystemExit(main())
