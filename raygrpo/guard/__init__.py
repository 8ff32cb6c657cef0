"""The reward-hacking guard (issue #17.1): held-out evaluation every ``guard.every`` steps, gold rewards never trained
on, diversity measures, and rules that warn, stop or roll back.

Layout: :mod:`~raygrpo.guard.guard` (a round, rollback checkpoints, history), :mod:`~raygrpo.guard.rules` (the rules:
pure functions of the history), :mod:`~raygrpo.guard.diversity` (the diversity measures),
:mod:`~raygrpo.guard.sampling` (the held-out samples, drawn on a rollout worker), :mod:`~raygrpo.guard.layout` (its
files in a run folder; light to import, for the dashboard). Nothing is imported here, so the dashboard's import of
the layout does not load torch.
"""
