"""ddpm-serve's HTTP service: settings, the step-level batching engine, metrics and the FastAPI app."""
