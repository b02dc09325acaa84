"""graceful's control plane.

    config       typed run config, validated once at load (`load_config`)
    rundir       the one owner of the run-directory layout
    chain        what a generation is trained against, from the registry
    apps         what a router serves, from the registry; the RayService builders
    catalogue    the run's retrieval catalogue: built once by the gallery generation, grown by production
    registry/    the single source of truth (lineage, statuses, rollouts, leases, audit)
    evaluation/  offline metrics (pure), the gate, reports
    rollout/     the decision rule (pure), traffic plans (pure), the controller
    demo/        the embedded lifecycle with simulated users
    cli/         the `graceful` command: parse, call the library, print, exit code

Dependency direction: orchestrator imports workers and serving, never the reverse; no
library module imports `orchestrator.cli`.
"""
