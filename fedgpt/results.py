"""`python -m fedgpt.results`: the results table (fedgpt/bench/results.py) under its usual command name."""

from fedgpt.bench.results import main

if __name__ == "__main__":
    import sys

    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
