"""Training-free repair: a linear map fitted in closed form in place of what pruning removed
(docs/algorithms.md section 8)."""
