"""Plumbing shared by SAG, PAG and SEG, in plain torch: layer specs, layer token grids, batch-row selection,
schedules."""
