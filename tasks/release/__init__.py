"""Releasing a model family: the artifact store and the Ray Serve application."""
