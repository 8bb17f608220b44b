"""Notices a guider that evaluates the model but never runs the model's post-CFG functions.

PAG and SAG add their term in a post-CFG function. Every guider of the host runs those (KSampler,
CFGGuider, BasicGuider, DualCFGGuider, PerpNegGuider in 0.3.75), and so do most custom guiders that
subclass CFGGuider; one that combines the predictions itself and skips them would leave the guidance
off while the node still batches its copy or records its map every step, and nothing would say so.

In a guider that runs them, the sampler's main cond call (``batched_pass.is_main_cond_call``) is
followed by the post-CFG functions before the model is called at another sigma. A second main call
at another sigma with no post-CFG call in the run so far means they are not run: the watch warns once
per run and from then on tells the node to do no extra work.
"""
from __future__ import annotations

import dataclasses
import logging

from .run_state import RunState, clear_after_sampling


@dataclasses.dataclass
class WatchRun(RunState):
    post_cfg_ran: bool = False
    last_sigma: object = None  # the sigma tensor of the last main call
    skipped: bool = False


class PostCfgWatch:
    def __init__(self, model, node: str):
        """Installed on ``model`` (the node's clone); ``node`` names the node in the warning."""
        self.node = node
        self.run = WatchRun()
        clear_after_sampling(model, self.run)

    def guider_skips_post_cfg(self, timestep) -> bool:
        """Call on each main cond call: True once this run's guider is known not to run post-CFG functions."""
        if self.run.skipped:
            return True
        if self.run.post_cfg_ran:
            return False
        # the values are read (a wait for the device) only at a second main call with no post-CFG call
        # before it, which a guider that runs the post-CFG functions never makes
        previous = self.run.last_sigma
        self.run.last_sigma = timestep
        if previous is None or float(previous.flatten()[0]) == float(timestep.flatten()[0]):
            return False
        self.run.skipped = True
        logging.warning(
            "%s is off for this run: the sampler's guider evaluated the model at two noise levels without "
            "running the model's post-CFG functions (sampler_post_cfg_function), which is where the guidance "
            "is added. Use a guider that runs them (KSampler, CFGGuider, BasicGuider, DualCFGGuider, "
            "PerpNegGuider) or remove the node; until the run ends it does no extra work.", self.node)
        return True

    def post_cfg_ran(self) -> None:
        """Call at the start of the node's post-CFG function."""
        self.run.post_cfg_ran = True
