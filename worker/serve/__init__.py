"""The inference server (``lmforge serve``): a FastAPI process that may import torch, which the
API (torch-free) calls over HTTP through :class:`app.inference.InferenceClient`."""
