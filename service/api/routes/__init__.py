"""One router per resource: generate (+ stream), OpenAI's images and models, the model (schedule, info),
operations (probes, metrics, the page)."""
