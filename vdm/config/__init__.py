"""Checks of a composed run config, before anything heavy runs: types against the targets' signatures
(``check``) and vdm's own ranges and cross-field rules (``rules``), the latter through the models' own
validation where a model states the rule."""
