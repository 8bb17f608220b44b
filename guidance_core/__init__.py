"""Plumbing shared by SAG and PAG, in plain torch: layer specs, batch-row selection, schedules."""
