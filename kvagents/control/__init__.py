"""Decisions made from the signals: answer parsing, best-of-N selection, early stop of weak samples, thinking
formats, budgets and the fast/slow reasoning controller.
"""
