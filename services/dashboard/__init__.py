"""The run dashboard: ``python -m services.dashboard --root outputs --port 8080`` (see app.py for its pages and API)."""
