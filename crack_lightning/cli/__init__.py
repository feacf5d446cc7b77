"""The command lines (``train.py``, ``predict.py``, ``serve.py`` and the run-folder tools): thin layers over the library."""
