"""``crossmodal serve``: indexes kept warm behind an HTTP API and a web page.

:mod:`.settings` and :mod:`.runtime` are light (the CLI reads them without importing the web
stack); :mod:`.service` is the library the routes call; :mod:`.app` is the thin FastAPI layer.
"""
