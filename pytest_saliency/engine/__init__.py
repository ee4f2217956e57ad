"""The machinery shared by every method: model state, layers, targets, rules and passes."""
