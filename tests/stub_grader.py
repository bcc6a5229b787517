"""Graders for the train-probe tests: deterministic functions of the sampled text (``python:stub_grader:...``)."""


def grade(text: str, reference: str) -> bool:
    return sum(map(ord, text)) % 2 == 0


def parse(text: str) -> str:
    return str(sum(map(ord, text)) % 3)


def broken(text: str, reference: str) -> bool:
    raise RuntimeError("this grader always fails")
