"""Readers of a labels output (what the job writes): the store, its row index, the training feed and
exports, evaluation against ground truth, previews. Nothing here imports the job or the models."""
