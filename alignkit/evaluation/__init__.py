"""Evaluation: negative-flip metrics of a model update (:mod:`.flips`), the flip report and the
``alignkit flips`` command (:mod:`.flip_report`, :mod:`.flips_cli`), eval suites (:mod:`.suites`), the
flip guard callback (:mod:`.flip_guard`) and unlearning metrics (:mod:`.unlearning`)."""
