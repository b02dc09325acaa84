"""graceful's serving data plane on Ray Serve (may import workers, never orchestrator).

    specs         the `serving:` config section
    refs          what to serve: ModelRef (name, uri, sha256)
    core          pure parts of the router: traffic plans, parsing, the feedback join
    router        the HTTP ingress (split, shadow, feedback, search, admin)
    deploy        deploying generations and the router (`start_serving`, `add_generation`)
    local         generations hosted in the router; model warm-up
    index         faiss retrieval indexes (flat, ivf, ivfpq, hnsw) with item ids, on disk
    catalogue     the persisted retrieval catalogue: items, vectors, manifest (one format owner)
    client        the HTTP client of the router (`RouterClient`)
    metric_names  the router's Prometheus names (an API)
"""

__all__ = ["specs", "refs", "core", "router", "deploy", "local", "index", "catalogue", "client", "metric_names"]
