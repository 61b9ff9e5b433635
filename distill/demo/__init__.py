"""The built-in demo: a procedural world of coloured shapes and tiny Flux-family models trained on it.

`world` renders and checks images; `models` builds, saves and loads the demo pipeline shipped in `sampling/demo_assets/`
(sampling/demo.py).
Rebuild everything with `python -m tools.make_demo`.
"""
