"""Models: the zoo, the artifact folder and its abstain rule, metrics, TFLite export, ensembles, the registry."""
