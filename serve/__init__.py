"""``python -m serve``: text to picture over HTTP, a page at ``/``, and continuous batching across users.

``serve.app.create_app(pipeline, limits)`` builds the FastAPI app; ``serve.scheduler.Scheduler`` decodes every
request's candidates in shared batches; ``serve.loadtest`` is the load test and benchmark. Needs the ``serve``
extra (``pip install -e '.[serve]'``).
"""
