"""The engine: step-level batching of DDPM chains over one model, with no HTTP in it.

``engine.Engine`` runs the loop (admit -> eps -> step -> advance); ``job.Job`` is one request;
``request_queue`` holds the waiting jobs under one admission policy; ``running_batch`` the samples in
flight; ``health`` the self-test and its backoff; ``job_handle`` bridges a job to asyncio.
"""
