"""Evaluation: unlearning metrics (:mod:`.unlearning`); negative-flip metrics join here."""
