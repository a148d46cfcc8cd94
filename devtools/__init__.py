"""Dev tooling, used from the source tree and never shipped: the commands that start the app's
processes, one supervisor for them, and the `make run` / `make demo` launcher."""
