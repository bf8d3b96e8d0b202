"""refusal-cliff: diagnose and repair the refusal cliff of reasoning models.

Implements "Refusal Falls off a Cliff: How Safety Alignment Fails in Reasoning?"
(arXiv 2510.06036): a linear refusal prober traced over every token of a model's
thinking, the attention heads that suppress refusal at the end of thinking, and
Cliff-as-a-Judge data selection for safety fine-tuning.
"""

__version__ = "0.1.0"
