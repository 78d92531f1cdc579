"""Long-document TTFT on a real vLLM engine (recompute vs kvcore hit vs vLLM's own hit).

The benchmark lives in the plugin (``kvcore_vllm.bench``) so that ``kvcore bench engine`` runs it
too; this script is the same thing for people who look in ``bench/``.
"""

from kvcore_vllm.bench import main

if __name__ == "__main__":
    main()
