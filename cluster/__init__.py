"""How a job reaches a Ray cluster: an embedded local cluster today."""
