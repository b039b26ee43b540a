"""derta: Decoupled Refusal Training (DeRTa) and the evaluation around it.

Train language models to refuse harmful requests at any position of a response
(arXiv 2407.09121), and measure whether they do.
"""

__version__ = "0.2.0"
