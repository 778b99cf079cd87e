"""KoboldLite's tests: `python3 -m pytest -q tests` (README: Run the tests)."""
