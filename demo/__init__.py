"""`make demo`: a real vLLM OpenAI server with kvcore on its defaults, against the same server
without kvcore, driven by a multi-round chat workload (or the Mooncake trace)."""
