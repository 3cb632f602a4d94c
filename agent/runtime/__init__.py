"""Running models: the backend seam (`backend`) and its implementations (`llama`), which
models are loaded (`residency`), who runs when (`scheduler`), and which variant an alias
resolves to on this device (`resolver`).

May import `agent.errors`, `agent.settings`, `agent.metrics`, `agent.hardware`,
`registry`. Never imports `agent.api`, `agent.cli` or `agent.security`; runtimes
(llama_cpp, onnxruntime) are imported only when a model loads.
"""
