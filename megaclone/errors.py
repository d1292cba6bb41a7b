"""The one exception type a user sees: it names the problem and how to fix it."""


class MegacloneError(Exception):
    """Bad input or a broken checkpoint, detected before anything is written."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f"\n  fix: {fix}" if fix else ""))
