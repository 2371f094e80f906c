"""Calibration, the one home of the plan-making flow: settings, the stages from capture to a chosen plan, the
candidate plans and their choice on held-out text, and the optional KL search."""
