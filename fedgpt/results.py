"""`python -m fedgpt.results`: the results table (fedgpt/bench/results.py), under the command name it has always had."""

from fedgpt.bench.results import main

if __name__ == "__main__":
    import sys

    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
