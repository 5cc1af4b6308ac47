"""Build the real models and print their figures: ``python -m onnxpress.models [digits] [minilm] [lm]``."""

import sys

from onnxpress.models import digits, lm, minilm

RUNNERS = {"digits": digits.main, "minilm": minilm.main, "lm": lm.main}


def main(argv: list[str]) -> int:
    names = argv or list(RUNNERS)
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(RUNNERS)}", file=sys.stderr)
        return 2
    for name in names:
        RUNNERS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
