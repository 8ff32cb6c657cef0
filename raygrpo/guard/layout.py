"""Where the guard writes in a run folder (raygrpo/guard/guard.py writes, services/dashboard reads)::

    <run>/guard/events.jsonl                 one line per guard round: step, action, message, the rules' events, signals
    <run>/guard/samples/step-NNNNNN/         the round's gallery of held-out samples (raygrpo/gallery.py's format)
    <run>/guard/checkpoints/step-NNNNNN/     the rollback checkpoint: the learner's rollback state at the best round (one)
"""

GUARD_DIR = "guard"
EVENTS = "events.jsonl"
