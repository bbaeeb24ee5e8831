"""PyAgent's own inference engine: model preparation and loading, generation, the OpenAI server.

Submodules import torch; import them explicitly (this package stays light).
"""
