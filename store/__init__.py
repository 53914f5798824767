"""The service's state, shared by the API and the worker.

Settings, database models and sessions, the job status machine, the runner's side of a job,
blob storage and the queue. Imports ``core``, SQLAlchemy and Celery; never torch, FastAPI,
``app`` or ``worker`` (docs/architecture.md, "Layers").
"""
