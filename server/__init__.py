"""The app-agnostic serving layer: settings, gunicorn config, worker, logging, metrics."""
