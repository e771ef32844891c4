"""The one error type users see: what is wrong, and what to do about it."""


class FoveaError(Exception):
    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.problem}: {self.hint}" if self.hint else self.problem
