"""Training by stage: `data` (examples to splits), `fit` (the run), `judge` (evaluation) and
`release` (merge, ship, promote, and the feedback loop that chains them)."""
