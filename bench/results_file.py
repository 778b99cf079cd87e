"""Where benchmark tables go: printed, and kept in bench/results/ for the README to point at."""

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def publish(name: str, lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name), "w", encoding="utf-8") as f:
        f.write(text + "\n")
