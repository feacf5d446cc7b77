"""The HTTP API and web page (``serve.py``)."""
