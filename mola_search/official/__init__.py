"""Round trip with the official MoLA code (GCYZSL/MoLA): a study exported so the official scripts train and
evaluate it as it was (`export.write_official_export`: training flags from the study's own settings in
`training`, the task as a dataset in the official layout in `data`). Checkpoints both ways and the one-line
flag set live with the adapter, in `mola_search.mola.official_checkpoint` and `mola_search.mola.official`."""
