"""ingest -> train -> generate -> augment (``pipeline.py``), and the ``dhvae`` command line (``cli.py``)."""
