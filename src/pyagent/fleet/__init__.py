"""The fleet runtime: agents, tools, logic manifests and the orchestrator that runs them."""
