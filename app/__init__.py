"""The application layer: the live pipeline (`pipeline`), its per-camera stats and Prometheus server
(`stats`, `prometheus`), and every command of the command line (`cli`). Nothing below it imports it
(tests/test_layers.py)."""
